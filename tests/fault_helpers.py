"""Helpers of the fault-injection suite: the service with test knobs, a stop cascade, the
audit of the database and of the sessions after a fault, and the figures of a run.

Every fault scenario ends with ``audit`` (database) and ``audit_stream`` (each connected
session) and records one ``Run`` in the ``Figures`` collector. The collector merges the runs
into ``build/fault-figures.json`` (so the figures of several test files add up) and prints
the whole table; ``python tests/fault_helpers.py`` prints it again as the Markdown table that
docs/RELIABILITY.md carries.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from service_harness import EventStream, Service, running_service

from tickguard.actors.fanout import FanoutConfig
from tickguard.actors.faults import FaultPoints, InjectedFault
from tickguard.actors.supervision import RestartPolicy
from tickguard.sim import Simulator
from tickguard.storage import Database

FIGURES_FILE = Path(__file__).resolve().parent.parent / "build" / "fault-figures.json"

# Restarts that are quick and many: a test injects several faults within seconds.
QUICK_RESTARTS = RestartPolicy(
    max_restarts=50, window_s=10.0, backoff_base_s=0.01, backoff_max_s=0.1
)

GUARD_S = 60.0  # hang guard of one scenario's wait (never a speed assertion)


# ------------------------------------------------------------------------------- the service
@asynccontextmanager
async def faulty_service(
    db: Database,
    sim: Simulator,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = QUICK_RESTARTS,
    fanout_config: FanoutConfig | None = None,
    **settings_changes: Any,
) -> AsyncIterator[Service]:
    """``service_harness.running_service`` with quick restarts by default."""
    async with running_service(
        db, sim, faults=faults, policy=policy, fanout_config=fanout_config, **settings_changes
    ) as service:
        yield service


def arm_timed_raise(faults: FaultPoints, name: str, fired_at: list[float], times: int = 1) -> None:
    """The next ``times`` hits of ``name`` raise ``InjectedFault``; each notes its time."""

    async def boom() -> None:
        fired_at.append(trio.current_time())
        raise InjectedFault(name)

    faults.arm(name, boom, times)


async def create_many(
    http: httpx.AsyncClient, bodies: Iterable[dict[str, Any]], *, workers: int = 16
) -> list[dict[str, Any]]:
    """POST every body to /api/positions with ``workers`` concurrent clients; the positions."""
    todo = list(bodies)
    created: list[dict[str, Any]] = []

    async def worker(start: int) -> None:
        for body in todo[start::workers]:
            response = await http.post("/api/positions", json=body)
            assert response.status_code == 201, response.text
            created.append(response.json()["data"])

    async with trio.open_nursery() as nursery:
        for start in range(workers):
            nursery.start_soon(worker, start)
    return created


def long_with_stop(user: str, stop: str, symbol: str = "BTC-USD") -> dict[str, Any]:
    return {
        "userId": user,
        "symbol": symbol,
        "side": "long",
        "entryPrice": "65000",
        "stopLoss": stop,
    }


async def until(condition: Any, timeout: float = GUARD_S, poll: float = 0.02) -> None:
    """Until the async ``condition()`` is true; fails after ``timeout`` (a hang guard)."""
    with trio.fail_after(timeout):
        # Polling on purpose: the database is the thing we wait on, and it signals nobody.
        while not await condition():  # noqa: ASYNC110
            await trio.sleep(poll)


async def all_closed(db: Database, ids: Iterable[str]) -> bool:
    wanted = [uuid.UUID(i) for i in ids]
    count = await db.fetchval(
        "SELECT count(*) FROM positions WHERE id = ANY($1::uuid[]) AND status = 'closed'", wanted
    )
    return bool(count == len(wanted))


# ------------------------------------------------------------------------------- the audits
@attrs.define
class Audit:
    """What the database says about a set of triggered and a set of untouched positions."""

    triggered: int = 0
    closed_once: int = 0
    lost: int = 0  # triggered, still open
    doubled: int = 0  # more than one position.closed event
    missing_events: int = 0  # closed without a position.closed event
    wrongly_closed: int = 0  # untouched, yet closed
    seq_problems: int = 0  # per user: a gap or a duplicate in events.seq

    def assert_clean(self) -> None:
        assert (self.lost, self.doubled, self.missing_events) == (0, 0, 0), self
        assert (self.wrongly_closed, self.seq_problems) == (0, 0), self
        assert self.closed_once == self.triggered, self


async def audit(db: Database, triggered: Iterable[str], untouched: Iterable[str] = ()) -> Audit:
    """Count, in the database, how each triggered position ended and whether untouched ones
    stayed open; also check every user's event seqs run 1..n without a gap or duplicate."""
    ids = [uuid.UUID(i) for i in triggered]
    rows = await db.fetch(
        """SELECT p.id, p.status,
                  (SELECT count(*) FROM events e
                    WHERE e.position_id = p.id AND e.type = 'position.closed') AS closes
             FROM positions p WHERE p.id = ANY($1::uuid[])""",
        ids,
    )
    result = Audit(triggered=len(ids))
    result.lost = len(ids) - len(rows)  # a row that vanished is lost too
    for row in rows:
        if row["status"] != "closed":
            result.lost += 1
        elif row["closes"] == 0:
            result.missing_events += 1
        elif row["closes"] > 1:
            result.doubled += 1
        else:
            result.closed_once += 1
    spared = [uuid.UUID(i) for i in untouched]
    if spared:
        result.wrongly_closed = await db.fetchval(
            "SELECT count(*) FROM positions WHERE id = ANY($1::uuid[]) AND status <> 'open'",
            spared,
        )
    result.seq_problems = await db.fetchval(
        """SELECT count(*) FROM (
             SELECT user_id, count(*) AS n, count(DISTINCT seq) AS d, max(seq) AS top
               FROM events GROUP BY user_id) s
            WHERE n <> d OR top <> n"""
    )
    return result


@attrs.define
class StreamAudit:
    closed_events: int = 0
    duplicates: int = 0  # a position.closed for one position seen twice
    missing: int = 0  # an expected position.closed not seen
    seq_gaps: int = 0  # a seq that is not the previous one + 1 (from connection.ready)

    def assert_clean(self) -> None:
        assert (self.duplicates, self.missing, self.seq_gaps) == (0, 0, 0), self


def audit_stream(stream: EventStream, expected_closed: Iterable[str]) -> StreamAudit:
    """Exactly one position.closed per expected id, and seqs that go up by one each time."""
    expected = set(expected_closed)
    seen: dict[str, int] = {}
    for message in stream.of_type("position.closed"):
        position_id = message["position"]["id"]
        seen[position_id] = seen.get(position_id, 0) + 1
    result = StreamAudit(closed_events=sum(seen.values()))
    result.duplicates = sum(n - 1 for n in seen.values() if n > 1)
    result.missing = len(expected - set(seen))
    previous: int | None = None
    for message in stream.messages:
        if message.get("type") == "connection.ready":
            previous = message["seq"]
        elif "seq" in message and previous is not None:
            if message["seq"] != previous + 1:
                result.seq_gaps += 1
            previous = message["seq"]
    return result


# ------------------------------------------------------------------------------- the figures
@attrs.define
class Run:
    """One scenario run's figures."""

    scenario: str
    variant: str = ""
    faults_injected: int = 0
    positions_triggered: int = 0
    closed_once: int = 0
    lost: int = 0
    doubled: int = 0
    duplicate_events: int = 0
    missing_events: int = 0
    recovery_s: float | None = None  # from the (first) fault to everything recovered
    fuzz_cases: int = 0
    server_errors: int = 0

    def add_audit(self, result: Audit) -> None:
        self.positions_triggered += result.triggered
        self.closed_once += result.closed_once
        self.lost += result.lost
        self.doubled += result.doubled
        self.missing_events += result.missing_events

    def add_stream(self, result: StreamAudit) -> None:
        self.duplicate_events += result.duplicates
        self.missing_events += result.missing


class Figures:
    """Collects the runs of one test module; ``flush`` merges them into FIGURES_FILE."""

    def __init__(self, path: Path = FIGURES_FILE) -> None:
        self.path = path
        self.runs: list[Run] = []

    def record(self, run: Run) -> Run:
        self.runs.append(run)
        return run

    def flush(self) -> None:
        if not self.runs:
            return
        stored = load_runs(self.path)
        fresh = {(r.scenario, r.variant) for r in self.runs}
        # A scenario run again replaces its previous figures; the others stay.
        merged = [r for r in stored if (r["scenario"], r["variant"]) not in fresh]
        merged += [attrs.asdict(r) for r in self.runs]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(merged, indent=1))
        print("\n" + summary_table(merged))


def load_runs(path: Path = FIGURES_FILE) -> list[dict[str, Any]]:
    try:
        runs: list[dict[str, Any]] = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return runs


def summary_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per scenario (its variants summed), then the totals."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_scenario.setdefault(run["scenario"], []).append(run)
    columns = (
        "faults_injected",
        "positions_triggered",
        "closed_once",
        "lost",
        "doubled",
        "duplicate_events",
        "missing_events",
        "fuzz_cases",
        "server_errors",
    )
    lines = [
        "| scenario | runs | faults | triggered | closed once | lost | doubled | dup events "
        "| missing events | recovery s (max) | fuzz cases | server errors |",
        "|---|" + "---|" * 11,
    ]
    totals = dict.fromkeys(columns, 0)
    total_runs = 0
    for scenario, group in sorted(by_scenario.items()):
        sums = {c: sum(r[c] for r in group) for c in columns}
        recoveries = [r["recovery_s"] for r in group if r["recovery_s"] is not None]
        recovery = f"{max(recoveries):.2f}" if recoveries else "–"
        lines.append(
            f"| {scenario} | {len(group)} | "
            + " | ".join(str(sums[c]) for c in columns[:7])
            + f" | {recovery} | {sums['fuzz_cases']} | {sums['server_errors']} |"
        )
        total_runs += len(group)
        for c in columns:
            totals[c] += sums[c]
    lines.append(
        f"| **total** | {total_runs} | "
        + " | ".join(str(totals[c]) for c in columns[:7])
        + f" | | {totals['fuzz_cases']} | {totals['server_errors']} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(summary_table(load_runs()) + "\n")


def seeds(*ci: int, soak: int = 8) -> tuple[object, ...]:
    """The seeds a random scenario runs with: ``ci`` always, and ``soak`` more under the
    ``soak`` marker (not selected by CI; run them with ``pytest -m soak``)."""
    extra = range(max(ci) + 1, max(ci) + 1 + soak)
    return (*ci, *(pytest.param(seed, marks=pytest.mark.soak) for seed in extra))
