#!/usr/bin/env bash
# The test command: set up, build the guests, run every test. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/build-guests.sh
cargo test --locked "$@"
