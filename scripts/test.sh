#!/usr/bin/env bash
# The test command: set up, build the guests, start a fresh test S3 server (moto), run
# every test, stop the server by its PID. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/build-guests.sh
eval "$(scripts/s3-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null || true' EXIT
cargo test --locked "$@"
