#!/usr/bin/env bash
# Records/s through the streams: file input and output against another revision's binary
# (best of N, runs interleaved so drift hits both alike), and S3 input, output and store on
# the test S3 server (moto), with where each checkpoint's time goes.
#
#   scripts/bench-io.sh [--against REV] [--runs N]
#
# --against builds REV's release binary in its own worktree (target/bench-against/REV),
# which takes a cold wasmtime build the first time. The machine should be otherwise idle.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
against=""
runs=5
while (($#)); do
  case "$1" in
    --against) against="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    *) echo "usage: $0 [--against REV] [--runs N]" >&2; exit 2 ;;
  esac
done
scripts/setup.sh
scripts/build-guests.sh
cargo build --quiet --release --locked
new="$root/target/release/wasnap"
out="$root/target/bench-io"
mkdir -p "$out"

old=""
if [ -n "$against" ]; then
  tree="$root/target/bench-against/$against"
  if [ ! -x "$tree/target/release/wasnap" ]; then
    rm -rf "$tree"
    git worktree add --force --detach "$tree" "$against" >/dev/null
    (cd "$tree" && cargo build --quiet --release --locked)
  fi
  old="$tree/target/release/wasnap"
fi

words() { awk -v n="$1" -v v="$2" 'BEGIN { srand(11); for (i = 0; i < n; i++) { k = 1 + int(rand() * 8); line = "";
  for (j = 0; j < k; j++) line = line (j ? " " : "") "w" int(rand() * v); print line } }'; }
numbers() { awk -v n="$1" 'BEGIN { srand(12); for (i = 0; i < n; i++) print int(rand() * 1000000) - 500000 }'; }
words 120000 20000 > "$out/words.txt"
numbers 120000 > "$out/numbers.txt"
words 1000000 1000 > "$out/counter.txt"

# records/s of one `wasnap bench` run: BIN GUEST INPUT EVERY [more bench arguments]. One
# pass of this binary (this script takes the best of its own runs, and an --against binary
# may predate --passes).
rate() {
  local bin="$1" guest="$2" input="$3" every="$4"
  shift 4
  [ "$bin" != "$new" ] || set -- --passes 1 "$@"
  "$bin" bench "target/guests/$guest.wasm" --input "$input" --checkpoint-every "$every" --no-baseline "$@" |
    sed -n 's/.*(\([0-9]*\) records\/s).*/\1/p'
}

best() { sort -n | tail -n 1; }

echo "== file input and output, local-disk store: best of $runs records/s"
printf '%-14s %12s %12s %8s\n' workload "this" "${against:-}" ratio
for spec in "counter counter.txt 10000" "wordcount words.txt 1000" "c-wordcount words.txt 1000" \
            "as-inventory words.txt 1000" "window numbers.txt 1000"; do
  set -- $spec
  : > "$out/new.rates"; : > "$out/old.rates"
  for _ in $(seq "$runs"); do
    rate "$new" "$1" "$out/$2" "$3" >> "$out/new.rates"
    [ -z "$old" ] || rate "$old" "$1" "$out/$2" "$3" >> "$out/old.rates"
  done
  n="$(best < "$out/new.rates")"
  if [ -n "$old" ]; then
    o="$(best < "$out/old.rates")"
    printf '%-14s %12s %12s %8s\n' "$1" "$n" "$o" "$(python3 -c "print(f'{$n/$o:.3f}x')")"
  else
    printf '%-14s %12s\n' "$1" "$n"
  fi
done

echo
echo "== S3 input, output and store (moto on 127.0.0.1, one request at a time)"
eval "$(scripts/s3-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null || true' EXIT
"$root/scripts/s3-server.sh" python - "$out/words.txt" "$out/numbers.txt" <<'PY'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"], region_name=os.environ["AWS_REGION"])
for path in sys.argv[1:]:
    s3.upload_file(path, os.environ["WASNAP_TEST_S3_BUCKET"], "bench-io/" + os.path.basename(path))
PY
bucket="s3://$WASNAP_TEST_S3_BUCKET"
for spec in "wordcount words.txt 1000" "c-wordcount words.txt 1000" "window numbers.txt 1000"; do
  set -- $spec
  prefix="$bucket/bench-io/run-$1-$$"
  echo "-- $1, a checkpoint every $3 records"
  "$new" bench "target/guests/$1.wasm" --input "$bucket/bench-io/$2" --output "$prefix/out" \
    --store "$prefix/store" --checkpoint-every "$3" --no-baseline --passes 1 |
    grep -E 'records/s|encode, mean|put \(|publish output|pause to commit|stall, mean'
done

echo
echo "== Kafka input and output (noida-db on 127.0.0.1), against file input and output: best of $runs records/s"
eval "$(scripts/kafka-server.sh start)"
trap 'kill "$WASNAP_TEST_S3_PID" 2>/dev/null; kill "$WASNAP_TEST_KAFKA_PID" 2>/dev/null || true' EXIT
tool() { "$root/scripts/kafka-server.sh" python "$root/scripts/kafka_tool.py" "$WASNAP_TEST_KAFKA" "$@"; }
printf '%-14s %12s %12s %12s %8s\n' workload file "kafka in" "kafka in+out" "in+out/file"
for spec in "counter counter.txt 1000" "wordcount words.txt 1000" "c-wordcount words.txt 1000"; do
  set -- $spec
  tool create "in-$1-$$" 1
  tool produce "in-$1-$$" 0 "$out/$2"
  : > "$out/file.rates"; : > "$out/kin.rates"; : > "$out/kio.rates"
  for i in $(seq "$runs"); do
    tool create "out-$1-$$-$i" 1
    rate "$new" "$1" "$out/$2" "$3" >> "$out/file.rates"
    rate "$new" "$1" "kafka://$WASNAP_TEST_KAFKA/in-$1-$$/0" "$3" >> "$out/kin.rates"
    rate "$new" "$1" "kafka://$WASNAP_TEST_KAFKA/in-$1-$$/0" "$3" \
      --output "kafka://$WASNAP_TEST_KAFKA/out-$1-$$-$i" >> "$out/kio.rates"
  done
  f="$(best < "$out/file.rates")" ki="$(best < "$out/kin.rates")" kio="$(best < "$out/kio.rates")"
  printf '%-14s %12s %12s %12s %8s\n' "$1" "$f" "$ki" "$kio" "$(python3 -c "print(f'{$kio/$f:.3f}x')")"
done
echo "-- where a checkpoint's time goes, c-wordcount, Kafka in and out:"
tool create "out-detail-$$" 1
"$new" bench target/guests/c-wordcount.wasm --input "kafka://$WASNAP_TEST_KAFKA/in-c-wordcount-$$/0" \
  --output "kafka://$WASNAP_TEST_KAFKA/out-detail-$$" --checkpoint-every 1000 --no-baseline --passes 1 |
  grep -E 'records/s|encode, mean|put \(|pause to commit|stall, mean'
