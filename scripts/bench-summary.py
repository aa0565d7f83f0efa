#!/usr/bin/env python3
"""One line per workload of `scripts/bench.sh`: bytes written vs. the baseline, stall, and
the durability tax.

For each NAME.jsonl (a run by count, `--checkpoint-every N`: every checkpoint its own
commit, the baseline at the same moments) and, beside it, NAME-coalesced.jsonl (the same
count with `--coalesce`, as `run` takes it), NAME-coalesced-long.jsonl (the same over the
long input, for its tax) and NAME-default.jsonl (the default policy: a
checkpoint a second, captures coalescing, over ten times the input) and NAME-s3.jsonl
(the same on the test S3 server), the columns: bytes
wasnap put (packs + manifests) and the baseline's, their ratio (baseline / wasnap: above 1
means wasnap wrote fewer), the share of dirty pages written as deltas, the stall (guest
paused, median and max), the durability tax of each policy (records/s under it ÷
records/s with checkpoints off: 1.00x is free), the coalesced run's commits per capture
and bytes against the strict run's, the default policy's commit lag (pause to
commit: median, p99, max), and on S3 the default policy's tax and commit lag p99.

Usage: bench-summary.py FILE.jsonl [FILE.jsonl ...]
"""

import json
import os
import sys


def load(path):
    records = [json.loads(line) for line in open(path) if line.strip()]
    summary = next((r for r in records if r.get("kind") == "summary"), {})
    return [r for r in records if r.get("kind") != "summary"], summary


def tax(summary):
    return f'{summary["tax"]:.2f}x' if "tax" in summary else "-"


print(f'{"workload":<18} {"memory":>10} {"ckpts":>5} {"wasnap":>11} {"baseline":>11} {"ratio":>7} '
      f'{"deltas":>7} {"stall p50":>10} {"stall max":>10} {"tax/N":>7} {"merged":>7} {"long":>7} '
      f'{"commits":>8} {"bytes":>6} {"tax 1s":>7} {"lag p50":>9} {"lag p99":>9} {"lag max":>9} '
      f'{"S3 tax":>7} {"S3 p99":>9}')
for path in sys.argv[1:]:
    recs, summary = load(path)
    default_path = path.removesuffix(".jsonl") + "-default.jsonl"
    default = load(default_path)[1] if os.path.exists(default_path) else {}
    merged_path = path.removesuffix(".jsonl") + "-coalesced.jsonl"
    merged = load(merged_path)[1] if os.path.exists(merged_path) else {}
    long_path = path.removesuffix(".jsonl") + "-coalesced-long.jsonl"
    merged_long = load(long_path)[1] if os.path.exists(long_path) else {}
    s3_path = path.removesuffix(".jsonl") + "-s3.jsonl"
    s3 = load(s3_path)[1] if os.path.exists(s3_path) else {}
    ours = sum(r["delta_bytes"] for r in recs)
    base = sum(r.get("baseline_bytes", 0) for r in recs)
    median = lambda key: sorted(r[key] for r in recs)[len(recs) // 2] / 1000
    name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
    ratio = f"{base / ours:.2f}x" if ours else "-"
    dirty = sum(r["dirty_pages"] for r in recs)
    deltas = f'{100 * sum(r["delta_pages"] for r in recs) / dirty:.0f} %' if dirty else "-"
    ms = lambda us: f"{us / 1000:>6.1f} ms" if us is not None else "-"
    commits = f'{merged["commits"]}/{merged["captures"]}' if merged else "-"
    merged_bytes = f'{merged["bytes_written"] / ours:.2f}' if merged and ours else "-"
    print(f'{name:<18} {recs[-1]["memory_bytes"] / 2**20:>6.1f} MiB {len(recs):>5} '
          f'{ours / 2**20:>7.2f} MiB {base / 2**20:>7.2f} MiB {ratio:>7} {deltas:>7} '
          f'{median("stall_us"):>7.2f} ms {max(r["stall_us"] for r in recs) / 1000:>7.2f} ms '
          f'{tax(summary):>7} {tax(merged):>7} {tax(merged_long):>7} {commits:>8} {merged_bytes:>6} {tax(default):>7} '
          f'{ms(default.get("commit_lag_p50_us")):>9} {ms(default.get("commit_lag_p99_us")):>9} '
          f'{ms(default.get("commit_lag_max_us")):>9} {tax(s3):>7} '
          f'{ms(s3.get("commit_lag_p99_us")):>9}')
