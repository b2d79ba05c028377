"""Benchmark 5, REST: ``GET /health``, ``GET /api/positions?userId=…&status=open`` (100 open
positions per user) and ``POST /api/positions`` under 32 concurrent connections, measured with
``wrk --latency`` against ``tickguard serve`` in its own process (client and server share the
machine's 2 cores), each as a fraction of B (issue 16).

B is the framework's own rate: ``bench.bare``, a bare quart-trio app under hypercorn with the
same settings, answering a fixed small JSON body, in its own process, measured with the same
wrk settings in the same run. Runs alternate B, /health, GET, POST for three rounds (one with
``--quick``; ``BENCH_REST_ROUNDS`` overrides), and each route's rate is divided by the B of its
own round, so that a figure compares across machines and across the load other work puts on
this one. Reported: median and range of req/s, of the fraction of B, of p50, p99 and p99/p50.

POSTs name a distinct user each (a Lua script numbers them), so no request waits on another
user's row lock; GETs cycle over ``GET_USERS`` users holding 100 open positions each. The POST
run is repeated against ``bench.serve_unbatched`` (the persistence actor committing one request
per transaction) to show what grouping concurrent creates buys.

With ``BENCH_PYSPY_ROUTES=bench/plots/rest-{route}-before.svg`` each route (``bare``,
``health``, ``get``, ``post``) is run once more after the rounds, not counted, under py-spy,
which writes its flame graph there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.bare import PATH as BARE_PATH
from bench.bare import bare_subprocess
from bench.common import (
    Context,
    Figure,
    Server,
    at_least,
    at_most,
    background,
    fresh_database,
    insert_positions,
    plot_path,
    postgres_settings,
    pyplot,
    python_path,
    serve_subprocess,
    write_result,
)
from tickguard.sim import open_simulator

NAME = "rest"
CONNECTIONS = 32
THREADS = 2
GET_USERS = 200
PER_USER = 100
# The old Node backend (not part of this repository, never run here), as issue 16 quotes it:
# this machine kind on 2026-12-01, alternating three rounds; and the figures of another day.
OLD_2026_12_01 = "POST 1,813-2,385/s, GET 100 657-776/s, /health 29,343-35,135/s"
OLD_EARLIER = "POST 2,809-2,939/s p99 33-39 ms, GET 100 688/s p99 131 ms"

POST_LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  n = 0
  prefix = "w" .. tostring(tid) .. "-" .. (args[1] or "0") .. "-"
end
function request()
  n = n + 1
  local body = '{"userId":"' .. prefix .. n .. '","symbol":"BTC-USD","side":"long",'
    .. '"entryPrice":"100","stopLoss":"90","takeProfit":"110"}'
  return wrk.format("POST", "/api/positions", {["Content-Type"] = "application/json"}, body)
end
"""

GET_LUA = """
function init(args)
  USERS = tonumber(args[1])
  n = math.random(0, USERS - 1)
end
function request()
  n = (n + 1) % USERS
  return wrk.format("GET", "/api/positions?userId=get-" .. n .. "&status=open")
end
"""

NAN = float("nan")  # a percentile wrk did not print (the raw output is kept in the JSON)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), totals and errors from ``wrk --latency``."""
    result: dict[str, Any] = {
        "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"([0-9]+) requests in", output).group(1)),  # type: ignore[union-attr]
        "non_2xx": 0,
        "socket_errors": 0,
    }
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE):
        result[f"p{pct}_ms"] = _ms(value)
    non = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", output)
    if non:
        result["non_2xx"] = int(non.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        result["socket_errors"] = sum(int(x) for x in errors.groups())
    return result


async def wrk(url: str, seconds: int, script: Path | None = None, *args: str) -> dict[str, Any]:
    """One ``wrk`` run of ``seconds`` against ``url``, with ``script`` if given (``args``
    reach its ``init``)."""
    command = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    if script is not None:
        command += ["-s", str(script), url, "--", *args]
    else:
        command.append(url)
    load = os.getloadavg()[0]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    output = done.stdout.decode()
    return {**parse_wrk(output), "seconds": seconds, "load_average": load, "output": output}


@attrs.frozen
class Route:
    """One measured route: the server it runs on, and how wrk drives it."""

    name: str
    label: str
    server: Server
    path: str = ""
    script: Path | None = None
    args: tuple[str, ...] = ()
    target: float | None = None  # the floor, as a fraction of B

    async def run(self, seconds: int, tag: str) -> dict[str, Any]:
        args = tuple(a.replace("{tag}", tag) for a in self.args)
        cpu = self.server.cpu_seconds()
        result = await wrk(self.server.base_url + self.path, seconds, self.script, *args)
        # The server's CPU time per answered request: less sensitive to what else runs on the
        # machine than the rate (though a busy machine inflates it too).
        used = self.server.cpu_seconds() - cpu
        result["server_cpu_ms"] = 1000 * used / max(1, result["requests"])
        return result


async def _profile(pid: int, seconds: int, out: str) -> trio.Process:
    """py-spy sampling ``pid`` for ``seconds`` into the flame graph ``out``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)  # noqa: ASYNC230 - tiny, once
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return await trio.lowlevel.open_process(
        [py_spy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(seconds)]
        + ["--format", "flamegraph", "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure(url: str, seconds: int, rounds: int, scripts: Path) -> dict[str, Any]:
    """``rounds`` rounds of B, /health, GET, POST, one after the other (each run after a 2 s
    warm-up that is discarded), so that every route sees the same load as the B of its
    round; then, with ``BENCH_PYSPY_ROUTES`` set, one more profiled run per route (not
    counted); then POST against the unbatched server."""
    out: dict[str, Any] = {"runs": {}}
    post, get = scripts / "post.lua", scripts / "get.lua"
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server, bare_subprocess() as bare:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                page = await http.get("/api/positions?userId=get-7&status=open")
                out["get_page_positions"] = len(page.json()["data"])
                out["get_page_bytes"] = len(page.content)
                out["health_body"] = (await http.get("/health")).text
            routes = [
                Route("bare", "B: bare quart-trio + hypercorn", bare, BARE_PATH),
                Route("health", "GET /health", server, "/health", target=0.9),
                Route(
                    "get",
                    f"GET {out['get_page_positions']} open positions",
                    server,
                    script=get,
                    args=(str(GET_USERS),),
                    target=0.5,
                ),
                Route(
                    "post", "POST /api/positions", server, script=post, args=("{tag}",), target=0.5
                ),
            ]
            out["labels"] = {r.name: r.label for r in routes}
            out["targets"] = {r.name: r.target for r in routes}
            for n in range(rounds):
                for route in routes:
                    await route.run(2, f"warm{n}")
                    out["runs"].setdefault(route.name, []).append(
                        await route.run(seconds, f"run{n}")
                    )
            pattern = os.environ.get("BENCH_PYSPY_ROUTES")
            if pattern:
                out["profiled"] = {}
                for route in routes:
                    target = pattern.replace("{route}", route.name)
                    profiler = await _profile(route.server.process.pid, seconds, target)
                    out["profiled"][route.name] = await route.run(seconds, "prof")
                    await profiler.wait()
                    out["profiled"][route.name]["flamegraph"] = target
        async with serve_subprocess(
            url, sim.url, module="bench.serve_unbatched", env={"PYTHONPATH": python_path()}
        ) as server:
            await wrk(server.base_url, 2, post, "warmu")
            out["post_unbatched"] = await wrk(server.base_url, seconds, post, "runu")
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per route over the rounds: req/s, req/s as a fraction of the same round's B, p50, p99,
    p99/p50, the server's CPU per request and that as a multiple of B's, each as median, min
    and max."""
    bare = raw["runs"]["bare"]
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in raw["runs"].items():
        summary[name] = {
            "rps": _spread([r["rps"] for r in runs]),
            "of_b": _spread([r["rps"] / b["rps"] for r, b in zip(runs, bare, strict=True)]),
            "p50_ms": _spread([r.get("p50_ms", NAN) for r in runs]),
            "p99_ms": _spread([r.get("p99_ms", NAN) for r in runs]),
            "p99_over_p50": _spread([r.get("p99_ms", NAN) / r.get("p50_ms", NAN) for r in runs]),
            "load_average": _spread([r["load_average"] for r in runs]),
            "server_cpu_ms": _spread([r["server_cpu_ms"] for r in runs]),
            "cpu_over_b": _spread(
                [r["server_cpu_ms"] / b["server_cpu_ms"] for r, b in zip(runs, bare, strict=True)]
            ),
        }
    return summary


def _range(spread: dict[str, float], fmt: str) -> str:
    return f"[{format(spread['min'], fmt)}-{format(spread['max'], fmt)}]"


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    seconds = 5 if ctx.quick else 15
    rounds = int(os.environ.get("BENCH_REST_ROUNDS") or (1 if ctx.quick else 3))
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        trio.run(
            insert_positions, url, background(GET_USERS * PER_USER, users=GET_USERS, prefix="get")
        )
        with tempfile.TemporaryDirectory() as tmp:
            scripts = Path(tmp)
            (scripts / "post.lua").write_text(POST_LUA)
            (scripts / "get.lua").write_text(GET_LUA)
            raw = trio.run(measure, url, seconds, rounds, scripts)
    ctx.json_dir.mkdir(parents=True, exist_ok=True)
    # The raw runs first: a summary that fails must not lose a five-minute measurement.
    (ctx.json_dir / f"{NAME}.raw.json").write_text(json.dumps(raw, indent=1, default=str))
    summary = summarise(raw)
    raw["summary"] = summary
    b = summary["bare"]
    loads = [r["load_average"] for rs in raw["runs"].values() for r in rs]
    figures = [
        Figure(
            f"B, bare app req/s (median of {rounds}) {_range(b['rps'], ',.0f')}",
            b["rps"]["median"],
            "req/s",
        ),
        Figure(
            f"1-min load average at each run's start {_range(_spread(loads), '.2f')}",
            statistics.median(loads),
            "",
        ),
    ]
    for name in ("health", "get", "post", "bare"):
        s, label, target = summary[name], raw["labels"][name], raw["targets"][name]
        if name != "bare":
            figures.append(
                Figure(f"{label} {_range(s['rps'], ',.0f')}", s["rps"]["median"], "req/s")
            )
            figures.append(
                Figure(
                    f"  as a fraction of B {_range(s['of_b'], '.2f')}",
                    s["of_b"]["median"],
                    "x B",
                    f">= {target} B",
                    at_least(s["of_b"]["median"], target),
                )
            )
        figures.append(
            Figure(
                f"  {name} server CPU per request {_range(s['server_cpu_ms'], '.2f')}",
                s["server_cpu_ms"]["median"],
                "ms",
            )
        )
        if name != "bare":
            figures.append(
                Figure(
                    f"    ÷ B's CPU per request {_range(s['cpu_over_b'], '.2f')}",
                    s["cpu_over_b"]["median"],
                    "x",
                )
            )
        figures.append(
            Figure(f"  {name} p50 {_range(s['p50_ms'], '.1f')}", s["p50_ms"]["median"], "ms")
        )
        figures.append(
            Figure(f"  {name} p99 {_range(s['p99_ms'], '.1f')}", s["p99_ms"]["median"], "ms")
        )
        figures.append(
            Figure(
                f"  {name} p99/p50 {_range(s['p99_over_p50'], '.1f')}",
                s["p99_over_p50"]["median"],
                "",
                "<= 4" if name != "bare" else "",
                at_most(s["p99_over_p50"]["median"], 4) if name != "bare" else None,
            )
        )
    unbatched = raw["post_unbatched"]
    every = [r for rs in raw["runs"].values() for r in rs] + [unbatched]
    figures += [
        Figure("POST, one request per transaction (max_batch=1)", unbatched["rps"], "req/s"),
        Figure("POST p99, max_batch=1", unbatched["p99_ms"], "ms"),
        Figure(f"  (old backend 2026-12-01: {OLD_2026_12_01})", None, ""),
        Figure(f"  (old backend, another day: {OLD_EARLIER})", None, ""),
        Figure(
            "non-2xx responses / socket errors (all runs)",
            sum(r["non_2xx"] + r["socket_errors"] for r in every),
            "",
        ),
    ]
    notes = []
    if figures[-1].value:
        notes.append("some requests failed: see data.runs.*.output")
    _plot(ctx, raw)
    return write_result(
        ctx,
        NAME,
        params={
            "connections": CONNECTIONS,
            "threads": THREADS,
            "seconds": seconds,
            "rounds": rounds,
            "get_users": GET_USERS,
            "positions_per_user": PER_USER,
            "b_rps": b["rps"],
            "load_average": _spread(loads),
            "wrk": subprocess.run(
                ["wrk", "-v"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0:1],
        },
        figures=figures,
        data=raw,
        pg=pg,
        started=started,
        notes=notes,
    )


def _plot(ctx: Context, raw: dict[str, Any]) -> None:
    plt = pyplot()
    summary = raw["summary"]
    names = ["bare", "health", "get", "post"]
    labels = ["B (bare)", "/health", "GET 100", "POST"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    x = list(range(len(names)))
    of_b = [summary[n]["of_b"]["median"] for n in names]
    errors = [
        [summary[n]["of_b"]["median"] - summary[n]["of_b"]["min"] for n in names],
        [summary[n]["of_b"]["max"] - summary[n]["of_b"]["median"] for n in names],
    ]
    left.bar(x, of_b, 0.6, yerr=errors, capsize=4)
    targets = [raw["targets"][n] for n in names]
    left.scatter(
        [i for i, t in zip(x, targets, strict=True) if t],
        [t for t in targets if t],
        marker="_",
        s=800,
        color="red",
        label="target",
        zorder=3,
    )
    left.set_xticks(x, labels)
    left.set_ylabel("req/s as a fraction of B (same round)")
    left.set_title(f"B = {summary['bare']['rps']['median']:,.0f} req/s (median)")
    left.legend()
    p50 = [summary[n]["p50_ms"]["median"] for n in names]
    p99 = [summary[n]["p99_ms"]["median"] for n in names]
    right.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    right.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    right.set_xticks(x, labels)
    right.set_ylabel("latency (ms), 32 connections")
    right.legend()
    fig.suptitle("REST under wrk -t2 -c32, servers in their own processes")
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
