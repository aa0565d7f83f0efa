#!/usr/bin/env bash
# The test command: set up, build the guests, lint, build, start a fresh test S3 server
# (moto) and fresh Kafka brokers (noida-db; tansu for consumer groups), run every test,
# stop them by their PIDs. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Formatting first: it takes a second and needs nothing else.
cargo fmt --check
scripts/setup.sh
scripts/build-guests.sh
# Lints with warnings as errors, and the shipped binary as users build it (without the
# `internals` feature the tests turn on).
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
cargo build --locked --bin wasnap
# The criterion benchmarks, each once in test mode on the small size, so they keep
# compiling and running.
WASNAP_BENCH_SIZES=16 cargo test --locked --benches
# Everything built before the servers start: an idle broker still takes CPU.
cargo test --locked --no-run "$@"
eval "$(scripts/s3-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null || true' EXIT
eval "$(scripts/kafka-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" "$WASNAP_TEST_KAFKA_PID" 2>/dev/null || true' EXIT
eval "$(scripts/kafka-server.sh start --tansu)"
trap 'kill "$WASNAP_TEST_S3_PID" "$WASNAP_TEST_KAFKA_PID" "$WASNAP_TEST_TANSU_PID" 2>/dev/null || true' EXIT
# The test suite (its summary closes the output).
cargo test --locked "$@"
