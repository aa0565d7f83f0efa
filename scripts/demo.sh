#!/usr/bin/env bash
# The main job, end to end, on the embedded default store (a local directory):
# set up, build wasnap and the guests, run the Rust word-count guest over 300 000 records,
# kill it with SIGKILL half-way, run the same command again to resume, and check the
# output against an uninterrupted run. Then the same for an unmodified WASI program in
# stdio mode. Everything lands under target/demo/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
echo "demo: setting up and building wasnap and its guests; a first build on a fresh machine"
echo "demo: takes minutes (15-20 on two cores), later ones seconds. Cargo shows its progress."
scripts/setup.sh
scripts/build-guests.sh
cargo build --locked
wasnap="$root/target/debug/wasnap"
demo="$root/target/demo"
rm -rf "$demo" && mkdir -p "$demo"

echo "demo: writing 300000 input records to $demo/input.txt"
awk -v n=300000 'BEGIN { srand(7); for (i = 0; i < n; i++) { k = 1 + int(rand() * 8); line = "";
  for (j = 0; j < k; j++) line = line (j ? " " : "") "w" int(rand() * 5000); print line } }' > "$demo/input.txt"

run=("$wasnap" run target/guests/wordcount.wasm --input "$demo/input.txt" --output "$demo/output.txt"
     --store "$demo/store" --checkpoint-every 1000)
echo "demo: ${run[*]}"
"${run[@]}" & pid=$!
sleep 0.5
kill -9 "$pid" 2>/dev/null && echo "demo: killed the run with SIGKILL" || echo "demo: the run finished before the kill"
wait "$pid" 2>/dev/null || true
echo "demo: the same command again resumes from the newest checkpoint"
"${run[@]}"

"$wasnap" run target/guests/wordcount.wasm --input "$demo/input.txt" --output "$demo/reference.txt" \
  --store memory:// --checkpoint-every 1000000000 --quiet
if cmp -s "$demo/output.txt" "$demo/reference.txt"; then
  echo "demo: output is byte-identical to an uninterrupted run ($(wc -l < "$demo/output.txt") lines)"
else
  echo "demo: OUTPUT DIFFERS from an uninterrupted run" >&2
  exit 1
fi
echo "demo: the last checkpoints in the store:"
"$wasnap" inspect --store "$demo/store" | tail -n 4
echo "demo: store size: $(du -sh "$demo/store" | cut -f1)"

echo
echo "demo: stdio mode: an ordinary Rust program (stdin().lines(), a HashMap), no wasnap ABI"
stdio=("$wasnap" run --stdio target/guests/stdio-wordfreq.wasm --input "$demo/input.txt"
       --output "$demo/stdio-output.txt" --store "$demo/stdio-store" --checkpoint-every-bytes 262144)
echo "demo: ${stdio[*]}"
"${stdio[@]}" & pid=$!
sleep 0.5
kill -9 "$pid" 2>/dev/null && echo "demo: killed the run with SIGKILL" || echo "demo: the run finished before the kill"
wait "$pid" 2>/dev/null || true
"${stdio[@]}"
"$wasnap" run --stdio target/guests/stdio-wordfreq.wasm --input "$demo/input.txt" \
  --output "$demo/stdio-reference.txt" --store memory:// --quiet
if cmp -s "$demo/stdio-output.txt" "$demo/stdio-reference.txt"; then
  echo "demo: stdio output is byte-identical to an uninterrupted run ($(wc -l < "$demo/stdio-output.txt") lines)"
else
  echo "demo: STDIO OUTPUT DIFFERS from an uninterrupted run" >&2
  exit 1
fi
