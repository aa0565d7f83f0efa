#!/usr/bin/env python3
"""The two tables of docs/BENCHMARKS.md that `scripts/bench.sh` measures, as Markdown rows,
from the JSON lines it keeps in target/bench/: "Workloads" (NAME.jsonl, by count with every
checkpoint its own commit, the baseline at the same moments) and "Durability tax"
(NAME.jsonl, NAME-coalesced.jsonl, NAME-coalesced-long.jsonl, NAME-default.jsonl and
NAME-s3.jsonl). Row labels are
the file names; the docs give them their descriptions.

Usage: bench-tables.py FILE.jsonl [FILE.jsonl ...]   (the NAME.jsonl files, in order)
"""

import json
import os
import sys


def load(path):
    if not os.path.exists(path):
        return [], {}
    records = [json.loads(line) for line in open(path) if line.strip()]
    summary = next((r for r in records if r.get("kind") == "summary"), {})
    return [r for r in records if r.get("kind") != "summary"], summary


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else 0


def tax(summary):
    return f'{summary["tax"]:.2f}x' if "tax" in summary else "-"


def lag(summary):
    if "commit_lag_p50_us" not in summary:
        return "-"
    return f'{summary["commit_lag_p50_us"] / 1000:.0f} / {summary["commit_lag_p99_us"] / 1000:.0f} ms'


def mib(b):
    return f"{b / 2**20:.2f} MiB"


workloads, taxes = [], []
for path in sys.argv[1:]:
    name = os.path.basename(path).removesuffix(".jsonl")
    recs, strict = load(path)
    stem = path.removesuffix(".jsonl")
    merged = load(stem + "-coalesced.jsonl")[1]
    merged_long = load(stem + "-coalesced-long.jsonl")[1]
    default = load(stem + "-default.jsonl")[1]
    s3 = load(stem + "-s3.jsonl")[1]
    ours = sum(r["delta_bytes"] for r in recs)
    base = sum(r.get("baseline_bytes", 0) for r in recs)
    manifests = sum(r["manifest_bytes"] for r in recs)
    encoded = sum(r["encoded_bytes"] for r in recs)
    dirty = sum(r["dirty_pages"] for r in recs)
    deltas = 100 * sum(r["delta_pages"] for r in recs) / dirty if dirty else 0
    workloads.append(
        f'| {name} | {recs[-1]["memory_bytes"] / 2**20:.1f} MiB | '
        f'{strict.get("records_per_sec", 0):,.0f} | {mib(ours)} | {mib(base)} | '
        f'{base / ours:.2f}x | {manifests / len(recs):.0f} B | {deltas:.0f} % | '
        f'{ours / max(encoded + manifests, 1):.2f}x | '
        f'{median([r["stall_us"] for r in recs]) / 1000:.2f} ms | '
        f'{median([r["commit_latency_us"] for r in recs]) / 1000:.1f} ms |'.replace(",", " ")
    )
    commits = f'{merged["commits"]} / {merged["captures"]}' if merged else "-"
    merged_bytes = f'{merged["bytes_written"] / ours:.2f}' if merged and ours else "-"
    taxes.append(
        f"| {name} | {tax(strict)} | {tax(merged)} | {tax(merged_long)} | {commits} | {merged_bytes} | "
        f"{tax(default)} | {lag(default)} | {tax(s3)} | {lag(s3)} |"
    )

print("| workload | memory | records/s | wasnap wrote | baseline | ratio | manifest | deltas "
      "| put/min | stall p50 | commit p50 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(workloads))
print()
print("| workload | every 1 000, each committed | every 1 000, coalescing | the same over the long input | its commits / captures "
      "| its bytes ÷ each committed | default (1 s), local | lag p50 / p99 | default (1 s), S3 "
      "| lag p50 / p99 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(taxes))
