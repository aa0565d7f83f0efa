#!/usr/bin/env bash
# Records/s and the pause of each workload with each dirty tracker, in one run: hashing
# every page vs the kernel's record of written pages (and auto, the default), the best
# of ROUNDS runs each (the machine is noisy; each a single pass). Prints one table with kernel/hash ratios. Expects the inputs scripts/bench.sh writes (it calls
# this at its end); run alone, it writes them itself.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-3}"
out="$root/target/bench"
wasnap="$root/target/release/wasnap"
if [ ! -x "$wasnap" ] || [ ! -s "$out/words.txt" ]; then
  scripts/setup.sh
  scripts/build-guests.sh
  cargo build --quiet --release --locked
  mkdir -p "$out"
  awk 'BEGIN { srand(11); for (i = 0; i < 120000; i++) { k = 1 + int(rand() * 8); line = "";
    for (j = 0; j < k; j++) line = line (j ? " " : "") "w" int(rand() * 20000); print line } }' > "$out/words.txt"
  awk 'BEGIN { srand(12); for (i = 0; i < 120000; i++) print int(rand() * 1000000) - 500000 }' > "$out/numbers.txt"
  head -n 30000 "$out/words.txt" > "$out/words-30k.txt"
fi

# "records/s pause_ms hashed_pages" of the fastest of ROUNDS runs of one workload with one tracker
measure() { # guest input tracker
  local best="0 0 0" summary rate
  for _ in $(seq "$rounds"); do
    summary="$("$wasnap" bench "target/guests/$1.wasm" --input "$2" --checkpoint-every 1000 \
      --no-baseline --passes 1 --dirty-tracking "$3")"
    rate="$(sed -n 's/.*(\([0-9]*\) records\/s).*/\1/p' <<<"$summary")"
    if [ "$rate" -gt "${best%% *}" ]; then
      best="$rate $(awk '/^stall, mean/ { print $3 }' <<<"$summary") $(awk '/^hashed pages per ckpt/ { print $5 }' <<<"$summary")"
    fi
  done
  echo "$best"
}

printf '%-16s %12s %12s %8s %11s %11s %8s %13s %13s\n' workload "hash rec/s" "kernel rec/s" ratio \
  "hash pause" "kern pause" ratio "hash pages" "kernel pages"
for w in "wordcount words.txt" "c-wordcount words.txt" "as-wordcount words.txt" \
         "window numbers.txt" "bigstate words-30k.txt"; do
  set -- $w
  read -r hr hp hh <<<"$(measure "$1" "$out/$2" hash)"
  read -r kr kp kh <<<"$(measure "$1" "$out/$2" kernel)"
  read -r ar _ _ <<<"$(measure "$1" "$out/$2" auto)"
  awk -v w="$1" -v hr="$hr" -v kr="$kr" -v hp="$hp" -v kp="$kp" -v hh="$hh" -v kh="$kh" -v ar="$ar" 'BEGIN {
    printf "%-16s %12d %12d %7.2fx %9.2fms %9.2fms %7.2fx %13.1f %13.1f   auto: %d rec/s\n",
      w, hr, kr, kr / hr, hp, kp, kp / hp, hh, kh, ar }'
done
