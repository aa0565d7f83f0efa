#!/usr/bin/env bash
# Run every workload guest through `wasnap bench` (release build, local-disk store with
# fsync, and the default policy once more on the test S3 server), print each summary, keep
# the JSON lines in target/bench/, and render docs/bench.svg from them. Each bench runs
# its guest three times under the policy and four times with checkpoints off, interleaved,
# and keeps the fastest of each (`--passes`). Takes about half an hour; the machine should
# be otherwise idle.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/build-guests.sh
cargo build --quiet --release --locked
wasnap="$root/target/release/wasnap"
out="$root/target/bench"
mkdir -p "$out"

words() { awk -v n="$1" -v v="$2" 'BEGIN { srand(11); for (i = 0; i < n; i++) { k = 1 + int(rand() * 8); line = "";
  for (j = 0; j < k; j++) line = line (j ? " " : "") "w" int(rand() * v); print line } }'; }
numbers() { awk -v n="$1" 'BEGIN { srand(12); for (i = 0; i < n; i++) print int(rand() * 1000000) - 500000 }'; }

words 120000 20000 > "$out/words.txt"
# A larger vocabulary: the AssemblyScript word count's heap grows to 16 MiB, the size the
# design measurements used (with 20 000 words it stays at 2 MiB, where the garbage of one
# checkpoint's records is much of the heap).
words 120000 100000 > "$out/words-100k.txt"
numbers 120000 > "$out/numbers.txt"
words 1000000 1000 > "$out/counter.txt"

# The test S3 server (moto, on this machine: its CPU is the guest's too), for the default
# policy on S3.
eval "$(scripts/s3-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null || true' EXIT

plots=()
run() { # name guest input every [copies [long-by-count]]
  # 1. By count, each checkpoint its own commit, the baseline at the same moments: the
  #    bytes and the plot. 2. By count as `run` does it, captures the store cannot keep
  #    up with merging: its commits and bytes against (1). 3. The same over `copies`
  #    copies of the input (default 10), 3-12 s of the guest's time: the tax at that
  #    count, past the start-up (a first checkpoint of all of the memory) and the last
  #    commit, which weigh on a short input (the window guest's 120 000 records take
  #    45 ms); unless `long-by-count` is "no". 4. The default policy (a checkpoint a
  #    second, coalescing) over the same copies, so that the interval, not the start-up
  #    and the end of the input, sets the checkpoints: the tax and the commit lag a user
  #    gets. 5. The same on S3.
  # Each bench also runs the guest with checkpoints off, for its durability tax.
  local copies="${5:-10}" long_by_count="${6:-yes}"
  local long="${3%.txt}-x$copies.txt"
  [ -s "$long" ] || for _ in $(seq "$copies"); do cat "$3"; done > "$long"
  echo "== $1 ($2, checkpoint every $4 records, alone and coalescing; then the default policy)"
  "$wasnap" bench "target/guests/$2.wasm" --input "$3" --checkpoint-every "$4" --json > "$out/$1.jsonl"
  "$wasnap" bench "target/guests/$2.wasm" --input "$3" --checkpoint-every "$4" --coalesce --no-baseline --json > "$out/$1-coalesced.jsonl"
  rm -f "$out/$1-coalesced-long.jsonl"
  [ "$long_by_count" = no ] || "$wasnap" bench "target/guests/$2.wasm" --input "$long" \
    --checkpoint-every "$4" --coalesce --no-baseline --json > "$out/$1-coalesced-long.jsonl"
  "$wasnap" bench "target/guests/$2.wasm" --input "$long" --no-baseline --json > "$out/$1-default.jsonl"
  tail -n 1 "$out/$1-default.jsonl"
  "$wasnap" bench "target/guests/$2.wasm" --input "$long" --no-baseline --json \
    --store "s3://$WASNAP_TEST_S3_BUCKET/bench/$1-$(date +%s)" > "$out/$1-s3.jsonl"
  tail -n 1 "$out/$1-s3.jsonl"
  plots+=("$1=$out/$1.jsonl")
}
run counter counter "$out/counter.txt" 10000 40
run wordcount-rust wordcount "$out/words.txt" 1000 30
run wordcount-c c-wordcount "$out/words.txt" 1000 30
run wordcount-as as-wordcount "$out/words.txt" 1000 20
run wordcount-as-16mib as-wordcount "$out/words-100k.txt" 1000
run sessions-c c-sessions "$out/words.txt" 1000 30
run inventory-as as-inventory "$out/words.txt" 1000 20
run window window "$out/numbers.txt" 1000 150
head -n 30000 "$out/words.txt" > "$out/words-30k.txt"
# 600 copies (about 6 s): its first checkpoint writes all of its 256 MiB (about 1 s to
# disk, 2-3 s to moto), which a short run would measure instead of the checkpoints after
# it. Not by count over them: a checkpoint every 1 000 records (0.3 ms of its time, each
# pause 3-6 ms) would take minutes, and the default policy is what such a guest runs.
run bigstate bigstate "$out/words-30k.txt" 1000 600 no

# Stdio mode: what the asyncify transform and checkpoints cost.
for program in stdio-wordfreq stdio-c-wordfreq; do
  echo "== $program (stdio mode, checkpoint every 64 KiB of input)"
  "$wasnap" bench --stdio "target/guests/$program.wasm" --input "$out/words.txt" --checkpoint-every-bytes 65536
done

echo "== dirty tracking: hashing vs the kernel's record"
scripts/bench-tracking.sh

echo
python3 scripts/bench-summary.py "${plots[@]#*=}"
python3 scripts/plot-bench.py docs/bench.svg "${plots[@]}"
echo "wrote docs/bench.svg"
