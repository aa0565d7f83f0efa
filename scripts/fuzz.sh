#!/usr/bin/env bash
# Fuzz wasnap's parsers of untrusted bytes and its module instrumentation with cargo-fuzz
# (libFuzzer): the targets in fuzz/fuzz_targets/ (manifest_decode, manifest_body,
# pack_parse, delta_codecs, instrument). Each must never panic, hang or allocate without
# bound on any input; some also check round trips (see the comment atop each target).
#
#   scripts/fuzz.sh [TARGET...] [--seconds N] [--keep-going] [--no-build]
#
# All targets, 600 s each, by default. --keep-going runs libFuzzer in fork mode (one
# worker still) and goes on after a crash, a timeout or an out-of-memory, collecting
# every one; by default a target stops at its first. --no-build runs the targets as last
# built (the build compiles the current src/, which may be mid-edit).
#
# Builds the targets (fuzz/ is its own workspace, target dir fuzz/target), seeds
# fuzz/corpus/<target>/ (manifests, packs and deltas by fuzz/seeds.py; the example
# guests of target/guests/ if built, guests/wat/*.wat if wat2wasm is installed), then
# runs the targets one after another, one libFuzzer worker each, one cargo job at a
# time, and prints per target the executions, the coverage and whether it crashed. A
# crash leaves its reproducer in fuzz/artifacts/<target>/ (replay: cargo fuzz run -O -a
# -s none TARGET FILE, or fuzz/target/x86_64-unknown-linux-gnu/release/TARGET FILE)
# and makes the script exit non-zero. Logs: fuzz/target/fuzz-logs/<target>.log.
#
# Stable Rust: built without a sanitizer (`-s none`: ASan needs nightly's -Zsanitizer),
# in release mode with debug assertions and overflow checks (`-O -a`). Installs
# cargo-fuzz if it is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_TARGETS=(manifest_decode manifest_body pack_parse delta_codecs instrument)
SECONDS_EACH=600
KEEP_GOING=0
BUILD=1
TARGETS=()

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) [ $# -ge 2 ] || usage 2; SECONDS_EACH="$2"; shift 2 ;;
        --seconds=*) SECONDS_EACH="${1#--seconds=}"; shift ;;
        --keep-going) KEEP_GOING=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; usage 2 ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done
case "$SECONDS_EACH" in
    ''|*[!0-9]*) echo "fuzz.sh: --seconds needs a whole number, got '$SECONDS_EACH'" >&2; exit 2 ;;
esac
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    if [ ! -f "$ROOT/fuzz/fuzz_targets/$t.rs" ]; then
        echo "fuzz.sh: no fuzz target '$t' (have: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

export PATH="$HOME/.cargo/bin:$PATH"
# One cargo/rustc job at a time, unless the caller says otherwise.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

BUILD_FLAGS=(-O -a -s none)
cd "$ROOT"

BIN="fuzz/target/x86_64-unknown-linux-gnu/release"
if [ "$BUILD" = 1 ]; then
    echo "== building fuzz targets: ${TARGETS[*]}"
    for t in "${TARGETS[@]}"; do
        cargo fuzz build "${BUILD_FLAGS[@]}" "$t"
    done
fi
for t in "${TARGETS[@]}"; do
    [ -x "$BIN/$t" ] || { echo "fuzz.sh: $BIN/$t is not built" >&2; exit 2; }
done

echo "== seeding fuzz/corpus"
if command -v python3 >/dev/null; then
    python3 fuzz/seeds.py fuzz/corpus
else
    echo "   (no python3: manifest, pack and delta seeds skipped)"
fi
mkdir -p fuzz/corpus/instrument
for wasm in target/guests/*.wasm; do
    [ -f "$wasm" ] || continue
    # Small guests only: libFuzzer's input size limit follows the largest seed.
    if [ "$(stat -c %s "$wasm")" -le 131072 ]; then
        cp -f "$wasm" "fuzz/corpus/instrument/seed-$(basename "$wasm")"
    fi
done
if command -v wat2wasm >/dev/null; then
    for wat in guests/wat/*.wat; do
        [ -f "$wat" ] || continue
        wat2wasm "$wat" -o "fuzz/corpus/instrument/seed-wat-$(basename "$wat" .wat).wasm" || true
    done
fi

LOGS="fuzz/target/fuzz-logs"
mkdir -p "$LOGS"
declare -A RESULT
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before="$(ls "fuzz/artifacts/$t" | sort)"
    log="$LOGS/$t.log"
    echo "== fuzzing $t for ${SECONDS_EACH}s (log: $log)"
    # The binary as built above (`cargo fuzz run` would rebuild first). -timeout: an
    # input that takes 10 s is a hang. -rss_limit_mb (and so the malloc limit): 2 GiB,
    # libFuzzer's default, stated.
    args=(-artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$SECONDS_EACH" -timeout=10
        -rss_limit_mb=2048 -print_final_stats=1)
    if [ "$KEEP_GOING" = 1 ]; then
        args+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    fi
    status=0
    started=$(date +%s)
    "$BIN/$t" "${args[@]}" "fuzz/corpus/$t" >"$log" 2>&1 || status=$?
    elapsed=$(( $(date +%s) - started ))
    new="$(comm -13 <(echo "$before") <(ls "fuzz/artifacts/$t" | sort) | grep -E '^(crash|leak|oom|timeout|slow-unit)-' || true)"
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)"
    rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)"
    cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+(/[0-9]+[a-zA-Z]*)?' "$log" | tail -1 || true)"
    if [ -z "$execs" ]; then
        # Fork mode has no final stats: its status lines start with the total executions.
        execs="$(grep -oE '^#[0-9]+: cov:' "$log" | tail -1 | grep -oE '[0-9]+' || true)"
        [ -z "$execs" ] || rate=$(( execs / (elapsed > 0 ? elapsed : 1) ))
    fi
    if [ "$status" -eq 0 ] && [ -z "$new" ]; then
        RESULT[$t]="ok: ${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}"
    else
        failed=1
        RESULT[$t]="FOUND (exit $status, $(echo $new | wc -w) artifacts): ${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}"
        grep -E "panicked at|ERROR: libFuzzer|Test unit written" "$log" | sort | uniq -c | sort -rn | head -8 | sed 's/^/   /' || true
        for a in $new; do echo "   reproducer: fuzz/artifacts/$t/$a"; done
    fi
    echo "   ${RESULT[$t]}"
done

echo "== summary (${SECONDS_EACH}s each)"
for t in "${TARGETS[@]}"; do
    printf '%-16s %s\n' "$t" "${RESULT[$t]}"
done
exit "$failed"
