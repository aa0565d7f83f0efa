#!/usr/bin/env bash
# Fuzz wasnap's parsers of untrusted bytes and its module instrumentation with cargo-fuzz
# (libFuzzer): the targets in fuzz/fuzz_targets/ (manifest_decode, manifest_body,
# pack_parse, delta_codecs, instrument). Each must never panic, hang or allocate without
# bound on any input; some also check round trips (see the comment atop each target).
#
#   scripts/fuzz.sh [TARGET...] [--seconds N]     (all targets, 600 s each, by default)
#
# Builds the targets (fuzz/ is its own workspace, target dir fuzz/target), seeds
# fuzz/corpus/<target>/ (manifests, packs and deltas by fuzz/seeds.py; the example
# guests of target/guests/ if built, guests/wat/*.wat if wat2wasm is installed), then
# runs the targets one after another, one libFuzzer worker each, one cargo job at a
# time, and prints per target the executions, the coverage and whether it crashed. A crash leaves its reproducer in
# fuzz/artifacts/<target>/ (replay: cargo fuzz run -O -a -s none TARGET FILE) and makes
# the script exit non-zero. Logs: fuzz/target/fuzz-logs/<target>.log.
#
# Stable Rust: built without a sanitizer (`-s none`: ASan needs nightly's -Zsanitizer),
# in release mode with debug assertions and overflow checks (`-O -a`). Installs
# cargo-fuzz if it is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_TARGETS=(manifest_decode manifest_body pack_parse delta_codecs instrument)
SECONDS_EACH=600
TARGETS=()

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) [ $# -ge 2 ] || usage 2; SECONDS_EACH="$2"; shift 2 ;;
        --seconds=*) SECONDS_EACH="${1#--seconds=}"; shift ;;
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

echo "== building fuzz targets: ${TARGETS[*]}"
for t in "${TARGETS[@]}"; do
    cargo fuzz build "${BUILD_FLAGS[@]}" "$t"
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
    # -timeout: an input that takes 10 s is a hang. -rss_limit_mb (and so the malloc
    # limit): 2 GiB, libFuzzer's default, stated.
    status=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    new="$(comm -13 <(echo "$before") <(ls "fuzz/artifacts/$t" | sort) | grep -E '^(crash|leak|oom|timeout|slow-unit)-' || true)"
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)"
    rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)"
    cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 || true)"
    if [ "$status" -eq 0 ] && [ -z "$new" ]; then
        RESULT[$t]="ok: ${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}"
    else
        failed=1
        RESULT[$t]="FOUND (exit $status): ${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}"
        grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -8 | sed 's/^/   /' || true
        for a in $new; do echo "   reproducer: fuzz/artifacts/$t/$a"; done
    fi
    echo "   ${RESULT[$t]}"
done

echo "== summary (${SECONDS_EACH}s each)"
for t in "${TARGETS[@]}"; do
    printf '%-16s %s\n' "$t" "${RESULT[$t]}"
done
exit "$failed"
