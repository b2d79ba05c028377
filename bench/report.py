"""``python -m bench.report [--json-dir DIR]``: the figures of the last run as Markdown tables
(what BENCHMARKS.md's "Latest figures" section is pasted from)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.__main__ import BENCHMARKS
from bench.common import REPO


def _value(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render(json_dir: Path) -> str:
    lines: list[str] = []
    first = None
    for name in BENCHMARKS:
        path = json_dir / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        first = first or result
        load = result["machine"]["load_average"][0]
        lines += [
            f"### {name}",
            "",
            f"Run {result['finished_at']}, {result['duration_s']} s, commit "
            f"`{result['machine']['git_commit'][:10]}`, 1-min load at the end {load:.2f}; "
            f"parameters `{json.dumps(result['params'])}`",
            "",
            "| figure | value | unit | target | |",
            "|---|--:|---|---|---|",
        ]
        for fig in result["figures"]:
            verdict = {True: "met", False: "**missed**", None: ""}[fig["met"]]
            lines.append(
                f"| {fig['name'].strip()} | {_value(fig['value'])} | {fig['unit']} | "
                f"{fig['target']} | {verdict} |"
            )
        lines += [f"\n> {flag}" for flag in result["flags"]]
        lines.append("")
    if first is not None:
        m, pg = first["machine"], first.get("postgres") or {}
        lines.insert(
            0,
            f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
            f"{m['platform']}.\n",
        )
        for result_name in BENCHMARKS:
            path = json_dir / f"{result_name}.json"
            if path.exists() and json.loads(path.read_text()).get("postgres"):
                pg = json.loads(path.read_text())["postgres"]
                break
        if pg:
            lines.insert(
                1,
                f"PostgreSQL {pg['server_version']}: synchronous_commit={pg['synchronous_commit']}"
                f", fsync={pg['fsync']}, full_page_writes={pg['full_page_writes']}.\n",
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--json-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.json_dir) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
