#!/usr/bin/env python3
"""One line per `wasnap bench --json` file: bytes written vs. the baseline, and stall.

Usage: bench-summary.py FILE.jsonl [FILE.jsonl ...]
"""

import json
import sys

print(f'{"workload":<16} {"memory":>10} {"ckpts":>5} {"wasnap":>11} {"baseline":>11} {"ratio":>7} '
      f'{"manifest":>9} {"stall p50":>10} {"stall max":>10} {"hash p50":>9} {"base hash":>10}')
for path in sys.argv[1:]:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    ours = sum(r["delta_bytes"] for r in recs)
    base = sum(r.get("baseline_bytes", 0) for r in recs)
    median = lambda key: sorted(r[key] for r in recs)[len(recs) // 2] / 1000
    name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
    manifest = sum(r["manifest_bytes"] for r in recs) / len(recs)
    ratio = f"{base / ours:.2f}x" if ours else "-"
    print(f'{name:<16} {recs[-1]["memory_bytes"] / 2**20:>6.1f} MiB {len(recs):>5} '
          f'{ours / 2**20:>7.2f} MiB {base / 2**20:>7.2f} MiB {ratio:>7} {manifest:>7.0f} B '
          f'{median("stall_us"):>7.2f} ms {max(r["stall_us"] for r in recs) / 1000:>7.2f} ms '
          f'{median("hash_us"):>6.2f} ms {median("baseline_hash_us"):>7.2f} ms')
