#!/usr/bin/env bash
# The test command: set up, build the guests, lint, build, start a fresh test S3 server
# (moto) and fresh Kafka brokers (noida-db; tansu for consumer groups), run every test,
# stop them by their PIDs. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Each phase starts with the seconds since the script began, on stderr: a slow CI run
# shows where its minutes went.
phase() { echo "test.sh: ${SECONDS}s $*" >&2; }
# On every exit: stop the servers this script started and a fleet run still going (by
# their PIDs), and show the fleet's output if it was not shown yet.
server_pids=()
fleet="" fleet_log=""
cleanup() {
  kill "${server_pids[@]}" 2>/dev/null || true
  if [ -n "$fleet" ]; then kill -- "-$fleet" 2>/dev/null || true; fi
  if [ -n "$fleet_log" ]; then cat "$fleet_log" || true; rm -f "$fleet_log"; fi
  phase end
}
trap cleanup EXIT
# Formatting first: it takes a second and needs nothing else.
cargo fmt --check
phase setup
scripts/setup.sh
phase guests
scripts/build-guests.sh
phase clippy
# Lints with warnings as errors, and the shipped binary as users build it (without the
# `internals` feature the tests turn on).
cargo clippy --locked --all-targets -- -D warnings
phase doc
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
phase build
cargo build --locked --bin wasnap
phase benches
# The criterion benchmarks, each once in test mode on the small size, so they keep
# compiling and running.
WASNAP_BENCH_SIZES=16 cargo test --locked --benches
phase "test build"
# Everything built before the servers start: an idle broker still takes CPU.
cargo test --locked --no-run "$@"
phase servers
eval "$(scripts/s3-server.sh start)"
server_pids+=("$WASNAP_TEST_S3_PID")
eval "$(scripts/kafka-server.sh start)"
server_pids+=("$WASNAP_TEST_KAFKA_PID")
eval "$(scripts/kafka-server.sh start --tansu)"
server_pids+=("$WASNAP_TEST_TANSU_PID")
phase tests
if (($#)); then
  # Tests chosen by the caller: as asked.
  cargo test --locked "$@"
  exit
fi
# The fleet's tests spend most of their time waiting for the group coordinator to notice a
# killed worker (the CPU was 85 % idle through them): they run beside the others, and their
# output follows the others' summary. In a session of its own, so that an exit part-way
# (a failure, a signal) stops its workers too.
fleet_log="$(mktemp)"
setsid -w cargo test --locked --test fleet >"$fleet_log" 2>&1 &
fleet=$!
# Every other test target cargo finds: tests/NAME.rs and tests/NAME/main.rs (a `[[test]]`
# elsewhere in Cargo.toml would need adding here).
targets=(--lib --bins)
for file in tests/*.rs tests/*/main.rs; do
  [ -e "$file" ] || continue
  name="$(basename "${file%/main.rs}" .rs)"
  [ "$name" = fleet ] || targets+=(--test "$name")
done
status=0
cargo test --locked "${targets[@]}" || status=$?
cargo test --locked --doc || status=$?
phase "fleet tests, waited for"
wait "$fleet" || status=$?
fleet=""
cat "$fleet_log"
rm -f "$fleet_log"
fleet_log=""
exit "$status"
