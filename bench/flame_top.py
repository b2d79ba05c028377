"""``python -m bench.flame_top FLAME.svg [-n 15] [--match TEXT]``: where the time goes in a
py-spy flame graph, as a table of functions by share of the samples.

py-spy (``--format flamegraph``) writes one ``<g>`` per frame of the merged stacks with its
title (``function (file:line) (N samples, P%)``), its depth (``y``) and its place among the
samples (``fg:x``, ``fg:w``). Here frames are merged by function and file (lines dropped):
*total* is the share of samples with the function anywhere on the stack (overlapping
recursive frames counted once), *self* the share with it on top. Idle samples are not in
py-spy's graph, so the shares are of the busy time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

_FRAME = re.compile(
    r'<title>(?P<title>[^<]*)</title><rect [^>]*?y="(?P<y>[0-9.]+)"[^>]*?'
    r'fg:x="(?P<x>[0-9]+)" fg:w="(?P<w>[0-9]+)"'
)
_NAME = re.compile(r"(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\) \(\d[\d,]* samples?, [0-9.]+%\)$")


def _unescape(text: str) -> str:
    return (
        text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    )


def frames(svg: str) -> list[tuple[str, float, int, int]]:
    """``(function (file), y, x, w)`` of every frame in the graph (the root ``all`` too)."""
    out = []
    for m in _FRAME.finditer(svg):
        title = _unescape(m.group("title"))
        named = _NAME.match(title)
        key = f"{named.group('name')} ({named.group('file')})" if named else title.split(" (")[0]
        out.append((key, float(m.group("y")), int(m.group("x")), int(m.group("w"))))
    return out


def top(svg: str) -> tuple[int, list[tuple[str, float, float]]]:
    """The samples in the graph and ``(function, total %, self %)`` by total, descending."""
    found = frames(svg)
    root = max(found, key=lambda f: f[3])
    total = root[3]
    step = 16.0 if any(f[1] > root[1] for f in found) else -16.0  # which way stacks grow
    by_depth: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for _, y, x, w in found:
        by_depth[y].append((x, w))
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    own: dict[str, int] = defaultdict(int)
    for key, y, x, w in found:
        if (x, w, y) == (root[2], root[3], root[1]):
            continue
        spans[key].append((x, x + w))
        children = sum(cw for cx, cw in by_depth.get(y + step, []) if x <= cx and cx + cw <= x + w)
        own[key] += w - children
    rows = []
    for key, intervals in spans.items():
        covered, end = 0, -1
        for start, stop in sorted(intervals):
            if stop <= end:
                continue
            covered += stop - max(start, end)
            end = stop
        rows.append((key, 100 * covered / total, 100 * own[key] / total))
    rows.sort(key=lambda r: r[1], reverse=True)
    return total, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame_top")
    parser.add_argument("svg", type=Path)
    parser.add_argument("-n", type=int, default=15, help="rows to print (default 15)")
    parser.add_argument("--self", action="store_true", help="sort by self instead of total")
    parser.add_argument("--match", default="", help="only functions whose name contains this")
    args = parser.parse_args(argv)
    samples, rows = top(args.svg.read_text())
    if args.self:
        rows.sort(key=lambda r: r[2], reverse=True)
    rows = [r for r in rows if args.match in r[0]]
    print(f"{args.svg.name}: {samples} busy samples")
    print("| function (file) | total % | self % |\n|---|--:|--:|")
    for key, total, self_ in rows[: args.n]:
        print(f"| `{key}` | {total:.1f} | {self_:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
