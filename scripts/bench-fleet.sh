#!/usr/bin/env bash
# Many tasks in one worker: 1, 8 and 32 partitions of one topic, each a task of the
# wordcount guest, on the test broker (noida-db) with a local-disk store. For each: total
# records/s (from the first record committed to the last), the worker's peak and idle
# resident memory and its threads, read from its own /metrics. The fixed cost per task
# is the difference between 32 idle tasks and 1, over 31.
#
#   scripts/bench-fleet.sh [--records N]   (N records in all, split among the partitions)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
records=200000
while (($#)); do
  case "$1" in
    --records) records="$2"; shift 2 ;;
    *) echo "usage: $0 [--records N]" >&2; exit 2 ;;
  esac
done
scripts/setup.sh
scripts/build-guests.sh
cargo build --quiet --release --locked
bin="$root/target/release/wasnap"
out="$root/target/bench-fleet"
rm -rf "$out"
mkdir -p "$out"
eval "$(scripts/kafka-server.sh start --parent-pid $$)"
trap 'scripts/kafka-server.sh stop >/dev/null 2>&1 || true' EXIT
tool() { "$root/scripts/kafka-server.sh" python scripts/kafka_tool.py "$WASNAP_TEST_KAFKA" "$@"; }
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
page() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' "http://$1/metrics" 2>/dev/null || true; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
metric() { page "$1" | awk -v m="$2" '$1 ~ "^"m"({|$)" { s += $2 } END { printf "%.0f\n", s }'; }

printf '%-6s %12s %14s %14s %8s\n' tasks "records/s" "peak RSS MiB" "idle RSS MiB" threads
declare -A idle_rss idle_threads
for tasks in 1 8 32; do
  topic="bench-$tasks-$$"
  tool create "$topic-in" "$tasks"
  tool create "$topic-out" "$tasks"
  per=$((records / tasks))
  for ((p = 0; p < tasks; p++)); do
    awk -v n="$per" -v p="$p" 'BEGIN { srand(p + 1); for (i = 0; i < n; i++) { k = 1 + int(rand() * 8); line = "";
      for (j = 0; j < k; j++) line = line (j ? " " : "") "w" int(rand() * 2000); print line } }' > "$out/in-$p"
    tool produce "$topic-in" "$p" "$out/in-$p"
  done
  addr="127.0.0.1:$(port)"
  "$bin" worker target/guests/wordcount.wasm --input "kafka://$WASNAP_TEST_KAFKA/$topic-in" \
    --output "kafka://$WASNAP_TEST_KAFKA/$topic-out" --store "$out/store-$tasks" --group "$topic" \
    --metrics "$addr" --cache-dir "$out/cache" 2> "$out/worker-$tasks.log" &
  worker=$!
  total=$((per * tasks))
  started=""
  while :; do
    done_records=$(metric "$addr" wasnap_task_input_offset || echo 0)
    now=$(date +%s.%N)
    if [ -z "$started" ] && [ "${done_records:-0}" -gt 0 ]; then started=$now; first=$done_records; fi
    [ "${done_records:-0}" -ge "$total" ] && break
    kill -0 "$worker" 2>/dev/null || { echo "worker died; see $out/worker-$tasks.log" >&2; exit 1; }
    sleep 0.2
  done
  rate=$(awk -v n="$((total - first))" -v a="$started" -v b="$now" 'BEGIN { printf "%.0f", n / (b - a) }')
  peak=$(metric "$addr" wasnap_process_peak_resident_bytes)
  sleep 3  # idle: every task caught up, page buffers handed back
  rss=$(metric "$addr" wasnap_process_resident_bytes)
  threads=$(metric "$addr" wasnap_process_threads)
  idle_rss[$tasks]=$rss
  idle_threads[$tasks]=$threads
  printf '%-6s %12s %14s %14s %8s\n' "$tasks" "$rate" "$(mib "$peak")" "$(mib "$rss")" "$threads"
  kill -TERM "$worker"
  wait "$worker"
done
echo "fixed cost per task (32 idle tasks less 1, over 31): $(mib $(( (${idle_rss[32]} - ${idle_rss[1]}) / 31 ))) MiB, $(awk -v a="${idle_threads[32]}" -v b="${idle_threads[1]}" 'BEGIN { printf "%.1f", (a - b) / 31 }') threads"
