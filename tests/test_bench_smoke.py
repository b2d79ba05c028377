"""The benchmark entry point keeps working: ``python -m bench --quick --only engine`` runs,
prints its table and writes a result file with the run's context; ``bench.roles`` runs every
part at its smoke size. Sizes are tiny and nothing is timed; the figures themselves are
BENCHMARKS.md's business."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_quick_engine_benchmark_writes_its_result(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "engine"]
        + ["--json-dir", str(tmp_path / "results"), "--plots-dir", str(tmp_path / "plots")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "== engine" in done.stdout
    result = json.loads((tmp_path / "results" / "engine.json").read_text())
    assert result["bench"] == "engine"
    assert [row["n"] for row in result["data"]["results"]] == [1_000, 10_000, 100_000]
    assert all(row["indexed_us"] > 0 for row in result["data"]["results"])
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["git_commit"]
    assert (tmp_path / "plots" / "engine.png").stat().st_size > 0


def test_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nonsense"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "invalid choice" in done.stderr


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8080
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    21.50ms   10.01ms 119.00ms   80.00%
  Latency Distribution
     50%  850.00us
     75%   25.00ms
     90%   35.00ms
     99%    1.20s
  3560 requests in 5.01s, 2.10MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    710.58
Transfer/sec:    429.00KB
"""


def test_wrk_output_is_read_with_its_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is not part of the installed package
    from bench.rest import parse_wrk

    result = parse_wrk(WRK_OUTPUT)
    assert result["rps"] == 710.58 and result["requests"] == 3560
    assert result["p50_ms"] == 0.85 and result["p75_ms"] == 25.0 and result["p99_ms"] == 1200.0
    assert result["non_2xx"] == 4 and result["socket_errors"] == 3


def test_percentiles_are_nearest_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from bench.common import distribution_ms, percentile

    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 50) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2
    summary = distribution_ms([0.001, 0.002, 0.010])
    assert summary["max_ms"] == 10.0 and summary["p50_ms"] == 2.0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_roles_benchmark_runs_every_part_at_smoke_size(database_url: str, tmp_path: Path) -> None:
    """``bench.roles`` end to end at ``BENCH_ROLES_SMOKE`` sizes (~30 s): every role process
    starts (api with ``--workers 2`` included), every wrk run answers, every create's event
    reaches the gateway session with Redis and without, and the standby takes over and closes
    the crossed stops. Only counts are checked; the figures are BENCHMARKS.md's business."""
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "roles"]
        + ["--json-dir", str(tmp_path / "results"), "--plots-dir", str(tmp_path / "plots")]
        # Any server the session may create databases on; its durability is not the point.
        + ["--database-url", database_url, "--allow-weak-durability"],
        cwd=REPO,
        env={**os.environ, "BENCH_ROLES_SMOKE": "1"},
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== roles" in done.stdout
    result = json.loads((tmp_path / "results" / "roles.json").read_text())
    runs = result["data"]["rest"]["runs"]
    assert sorted(runs) == ["bare", "get_1", "get_2", "post_1", "post_2"]
    for key, rounds in runs.items():
        assert len(rounds) == 1 and rounds[0]["requests"] > 0, key
        assert rounds[0]["non_2xx"] == 0 and rounds[0]["socket_errors"] == 0, key
    for key in ("latency", "latency_no_redis"):
        latency = result["data"][key]
        assert latency["creates"] == 20
        assert latency["from_post_sent"]["count"] == latency["from_201"]["count"] == 20
    [takeover] = result["data"]["takeover"]
    assert takeover["killed"] != takeover["new_leader"]
    assert takeover["positions"] == 3 and takeover["all_stop_loss"]
    assert 0 < takeover["to_leader_s"] and 0 < takeover["to_closed_s"]
