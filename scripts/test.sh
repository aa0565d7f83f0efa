#!/usr/bin/env bash
# The test command: set up, build the guests, start a fresh test S3 server (moto) and
# fresh Kafka brokers (noida-db; tansu for consumer groups), run every test, stop them by
# their PIDs. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/build-guests.sh
eval "$(scripts/s3-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null || true' EXIT
eval "$(scripts/kafka-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" "$WASNAP_TEST_KAFKA_PID" 2>/dev/null || true' EXIT
eval "$(scripts/kafka-server.sh start --tansu)"
trap 'kill "$WASNAP_TEST_S3_PID" "$WASNAP_TEST_KAFKA_PID" "$WASNAP_TEST_TANSU_PID" 2>/dev/null || true' EXIT
# The criterion benchmarks, each once in test mode on the small size, so they keep
# compiling and running; then the test suite (its summary closes the output).
WASNAP_BENCH_SIZES=16 cargo test --locked --benches
cargo test --locked "$@"
