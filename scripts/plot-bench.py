#!/usr/bin/env python3
"""Render `wasnap bench --json` output to an SVG (no third-party packages).

Usage: plot-bench.py OUT.svg GUEST=FILE.jsonl [GUEST=FILE.jsonl ...]

Left column, one panel per guest: bytes put per checkpoint, wasnap vs. the Wasman-style
baseline (log scale). Right: stall time (guest paused) against memory size, every
checkpoint of every guest.
"""

import json
import math
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def load(path):
    """The per-commit records (the run's summary line, last, is not one)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("kind") != "summary"]


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;")


def decade(b):
    """An axis label for a power of ten, in decimal units: 1 kB, 10 kB, 100 kB, 1 MB …"""
    for unit in ["B", "kB", "MB", "GB"]:
        if b < 999.5 or unit == "GB":
            return f"{b:.0f} {unit}"
        b /= 1000


def human(b):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


class Panel:
    def __init__(self, x, y, w, h, title, xlabel, ylabel, xs, ys, xlog=False, ylog=True):
        self.x, self.y, self.w, self.h = x, y, w, h
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xlog, self.ylog = xlog, ylog
        f = (lambda v: math.log10(max(v, 1e-9))) if xlog else (lambda v: v)
        g = (lambda v: math.log10(max(v, 1e-9))) if ylog else (lambda v: v)
        self.fx, self.fy = f, g
        xs, ys = [f(v) for v in xs], [g(v) for v in ys]
        self.x0, self.x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        self.y0, self.y1 = (math.floor(min(ys)), math.ceil(max(ys))) if ylog else (0, max(ys) * 1.1 or 1)
        if self.y1 == self.y0:
            self.y1 += 1

    def px(self, v):
        return self.x + 70 + (self.fx(v) - self.x0) / (self.x1 - self.x0) * (self.w - 80)

    def py(self, v):
        return self.y + self.h - 30 - (self.fy(v) - self.y0) / (self.y1 - self.y0) * (self.h - 50)

    def frame(self, out, yfmt):
        out.append(f'<text x="{self.x + 70}" y="{self.y + 12}" font-weight="bold">{esc(self.title)}</text>')
        out.append(f'<rect x="{self.x + 70}" y="{self.y + 20}" width="{self.w - 80}" height="{self.h - 50}" fill="none" stroke="#999"/>')
        if self.ylog:
            for e in range(int(self.y0), int(self.y1) + 1):
                yy = self.py(10 ** e)
                out.append(f'<line x1="{self.x + 70}" x2="{self.x + self.w - 10}" y1="{yy}" y2="{yy}" stroke="#eee"/>')
                out.append(f'<text x="{self.x + 66}" y="{yy + 4}" text-anchor="end" font-size="10">{yfmt(10 ** e)}</text>')
        out.append(f'<text x="{self.x + self.w / 2}" y="{self.y + self.h - 5}" text-anchor="middle" font-size="11">{esc(self.xlabel)}</text>')
        out.append(f'<text x="{self.x + 12}" y="{self.y + self.h / 2}" font-size="11" transform="rotate(-90 {self.x + 12} {self.y + self.h / 2})" text-anchor="middle">{esc(self.ylabel)}</text>')

    def line(self, out, xs, ys, color, dash=""):
        pts = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5" {dash}/>')


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_path, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    data = [(name, load(path)) for name, path in runs]
    panel_h, width = 170, 1000
    height = max(len(data) * panel_h, 2 * panel_h) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>']
    for i, (name, recs) in enumerate(data):
        gens = [r["generation"] for r in recs]
        ours = [max(r["delta_bytes"], 1) for r in recs]
        base = [max(r.get("baseline_bytes", 1), 1) for r in recs]
        total_ours, total_base = sum(ours), sum(base)
        ratio = f"{total_base / total_ours:.2f}x fewer" if total_ours <= total_base else f"{total_ours / total_base:.2f}x MORE"
        p = Panel(0, 30 + i * panel_h, 560, panel_h, f"{name}: bytes per checkpoint (wasnap {ratio})",
                  "checkpoint", "bytes", gens, ours + base)
        p.frame(out, decade)
        p.line(out, gens, base, "#999", 'stroke-dasharray="4 3"')
        p.line(out, gens, ours, COLORS[i % len(COLORS)])
    out.append('<text x="10" y="18" font-size="13">solid: wasnap (pack + manifest) · dashed: Wasman-style baseline (gzip full every 5th, FNV-64a 4 KiB deltas)</text>')

    mem = [r["memory_bytes"] for _, recs in data for r in recs]
    stall = [max(r["stall_us"], 1) / 1000 for _, recs in data for r in recs]
    p = Panel(580, 30, 410, 2 * panel_h, "stall (guest paused) vs memory size", "memory size (log)", "stall, ms",
              mem, stall, xlog=True)
    p.frame(out, lambda v: f"{v:g}")
    for i, (name, recs) in enumerate(data):
        c = COLORS[i % len(COLORS)]
        for r in recs:
            out.append(f'<circle cx="{p.px(r["memory_bytes"]):.1f}" cy="{p.py(max(r["stall_us"], 1) / 1000):.1f}" r="2.5" fill="{c}" fill-opacity="0.6"/>')
        ly = 30 + 2 * panel_h + 15 + i * 15
        out.append(f'<circle cx="640" cy="{ly - 4}" r="4" fill="{c}"/><text x="650" y="{ly}">{esc(name)} ({human(max(r["memory_bytes"] for r in recs))})</text>')
    out.append("</svg>")
    with open(out_path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
