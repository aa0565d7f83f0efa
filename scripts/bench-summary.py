#!/usr/bin/env python3
"""One line per `wasnap bench --json` file: bytes written vs. the baseline, and stall.

Columns: bytes wasnap put (packs + manifests) and the baseline's, their ratio
(baseline / wasnap: above 1 means wasnap wrote fewer), the mean manifest, the share of
dirty pages written as deltas, the overhead of what was put over the dirty pages'
compressed frames plus the manifest (packs also carry headers and compacted frames),
the stall (guest paused) and the time from pause to commit.

Usage: bench-summary.py FILE.jsonl [FILE.jsonl ...]
"""

import json
import sys

print(f'{"workload":<16} {"memory":>10} {"ckpts":>5} {"wasnap":>11} {"baseline":>11} {"ratio":>7} '
      f'{"manifest":>9} {"deltas":>7} {"put/min":>8} {"stall p50":>10} {"stall max":>10} '
      f'{"commit p50":>11}')
for path in sys.argv[1:]:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    ours = sum(r["delta_bytes"] for r in recs)
    base = sum(r.get("baseline_bytes", 0) for r in recs)
    median = lambda key: sorted(r[key] for r in recs)[len(recs) // 2] / 1000
    name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
    manifest = sum(r["manifest_bytes"] for r in recs) / len(recs)
    ratio = f"{base / ours:.2f}x" if ours else "-"
    dirty = sum(r["dirty_pages"] for r in recs)
    deltas = f'{100 * sum(r["delta_pages"] for r in recs) / dirty:.0f} %' if dirty else "-"
    minimum = sum(r["encoded_bytes"] + r["manifest_bytes"] for r in recs)
    overhead = f"{ours / minimum:.2f}x" if minimum else "-"
    print(f'{name:<16} {recs[-1]["memory_bytes"] / 2**20:>6.1f} MiB {len(recs):>5} '
          f'{ours / 2**20:>7.2f} MiB {base / 2**20:>7.2f} MiB {ratio:>7} {manifest:>7.0f} B '
          f'{deltas:>7} {overhead:>8} '
          f'{median("stall_us"):>7.2f} ms {max(r["stall_us"] for r in recs) / 1000:>7.2f} ms '
          f'{median("commit_latency_us"):>8.2f} ms')
