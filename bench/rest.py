"""Benchmark 5, REST: ``POST /api/positions`` and ``GET /api/positions?userId=…&status=open``
(100 open positions per user) under 32 concurrent connections, measured with ``wrk`` against
``tickguard serve`` in its own process (client and server share the machine's 2 cores).

POSTs name a distinct user each (a Lua script numbers them), so no request waits on another
user's row lock; GETs cycle over ``GET_USERS`` users holding 100 open positions each. The POST
run is repeated against ``bench.serve_unbatched`` (the persistence actor committing one request
per transaction) to show what grouping concurrent creates buys.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.common import (
    REPO,
    Context,
    Figure,
    at_least,
    background,
    fresh_database,
    insert_positions,
    plot_path,
    postgres_settings,
    pyplot,
    serve_subprocess,
    write_result,
)
from tickguard.sim import open_simulator

NAME = "rest"
CONNECTIONS = 32
THREADS = 2
GET_USERS = 200
PER_USER = 100
OLD = {"post_rps": (2809, 2939), "post_p99_ms": (33, 39), "get_rps": 688, "get_p99_ms": 131}

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
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.MULTILINE):
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


async def wrk(base_url: str, script: Path, seconds: int, *args: str) -> dict[str, Any]:
    """One ``wrk`` run of ``seconds`` with ``script`` (``args`` reach its ``init``)."""
    done = await trio.run_process(
        ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
        + ["-s", str(script), base_url, "--", *args],
        capture_stdout=True,
        capture_stderr=True,
    )
    output = done.stdout.decode()
    return {**parse_wrk(output), "seconds": seconds, "output": output}


async def measure(url: str, seconds: int, scripts: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    post, get = scripts / "post.lua", scripts / "get.lua"
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                page = await http.get("/api/positions?userId=get-7&status=open")
                out["get_page_positions"] = len(page.json()["data"])
                out["get_page_bytes"] = len(page.content)
            await wrk(server.base_url, post, 2, "warm1")  # warm-up, discarded
            out["post"] = await wrk(server.base_url, post, seconds, "run1")
            await wrk(server.base_url, get, 2, str(GET_USERS))
            out["get"] = await wrk(server.base_url, get, seconds, str(GET_USERS))
        async with serve_subprocess(
            url, sim.url, module="bench.serve_unbatched", env={"PYTHONPATH": str(REPO)}
        ) as server:
            await wrk(server.base_url, post, 2, "warm2")
            out["post_unbatched"] = await wrk(server.base_url, post, seconds, "run2")
    return out


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    seconds = 5 if ctx.quick else 15
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        trio.run(
            insert_positions, url, background(GET_USERS * PER_USER, users=GET_USERS, prefix="get")
        )
        with tempfile.TemporaryDirectory() as tmp:
            scripts = Path(tmp)
            (scripts / "post.lua").write_text(POST_LUA)
            (scripts / "get.lua").write_text(GET_LUA)
            raw = trio.run(measure, url, seconds, scripts)
    post, get, unbatched = raw["post"], raw["get"], raw["post_unbatched"]
    figures = [
        Figure(
            "POST /api/positions", post["rps"], "req/s", ">= 1,500/s", at_least(post["rps"], 1500)
        ),
        Figure("POST p50", post["p50_ms"], "ms"),
        Figure("POST p99", post["p99_ms"], "ms"),
        Figure("  (old backend POST 2,809-2,939/s, p99 33-39 ms)", None, ""),
        Figure(
            f"GET {raw['get_page_positions']} open positions",
            get["rps"],
            "req/s",
            ">= 1,000/s",
            at_least(get["rps"], 1000),
        ),
        Figure("GET p50", get["p50_ms"], "ms"),
        Figure("GET p99", get["p99_ms"], "ms"),
        Figure("  (old backend GET 688/s, p99 131 ms)", None, ""),
        Figure("POST, one request per transaction (max_batch=1)", unbatched["rps"], "req/s"),
        Figure("POST p99, max_batch=1", unbatched["p99_ms"], "ms"),
        Figure(
            "non-2xx responses / socket errors (all runs)",
            sum(r["non_2xx"] + r["socket_errors"] for r in (post, get, unbatched)),
            "",
        ),
    ]
    notes = []
    if figures[-1].value:
        notes.append("some requests failed: see data.*.output")
    _plot(ctx, raw)
    return write_result(
        ctx,
        NAME,
        params={
            "connections": CONNECTIONS,
            "threads": THREADS,
            "seconds": seconds,
            "get_users": GET_USERS,
            "positions_per_user": PER_USER,
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    labels = ["POST", "POST\nmax_batch=1", "GET 100"]
    ours = [raw["post"]["rps"], raw["post_unbatched"]["rps"], raw["get"]["rps"]]
    old = [sum(OLD["post_rps"]) / 2, float("nan"), OLD["get_rps"]]
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], ours, 0.4, label="tickguard")
    left.bar([i + 0.2 for i in x], old, 0.4, label="old backend", color="grey")
    left.scatter([0, 2], [1500, 1000], marker="_", s=800, color="red", label="target", zorder=3)
    left.set_xticks(list(x), labels)
    left.set_ylabel("requests/s (32 connections)")
    left.legend()
    p99 = [raw["post"]["p99_ms"], raw["post_unbatched"]["p99_ms"], raw["get"]["p99_ms"]]
    old_p99 = [sum(OLD["post_p99_ms"]) / 2, float("nan"), OLD["get_p99_ms"]]
    right.bar([i - 0.2 for i in x], p99, 0.4, label="tickguard")
    right.bar([i + 0.2 for i in x], old_p99, 0.4, label="old backend", color="grey")
    right.set_xticks(list(x), labels)
    right.set_ylabel("p99 latency (ms)")
    fig.suptitle("REST under wrk, server in its own process")
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
