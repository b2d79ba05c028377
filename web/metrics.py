"""``GET /metrics``: the actors' counters in Prometheus text format, read at scrape time.

The actors keep plain counters (``FeedStatus``, ``EngineStats`` per symbol,
``PersistenceStats``, ``FanoutStats``); nothing here is updated on the hot path. At each scrape
``TickguardCollector`` reads them (synchronously, so in one Trio scheduling step: a consistent
view) and builds the metric families. Each app has its own ``CollectorRegistry`` (in
``app.extensions``), never prometheus-client's global one, so several apps in one process
(tests) do not clash.

Metrics (``{label}``):

- ``tickguard_feed_ticks_total{symbol}``, ``tickguard_feed_missed_trades_total{symbol}``,
  ``tickguard_feed_product_live{symbol}`` (1 when live, else 0),
  ``tickguard_feed_product_halted{symbol}`` (1 while Coinbase's status says it is not trading:
  nothing triggers on it), ``tickguard_feed_connected``,
  ``tickguard_feed_reconnects_total``, ``tickguard_feed_malformed_total``
- ``tickguard_engine_window_seconds{symbol}`` (time spent judging the last window),
  ``tickguard_engine_windows_total{symbol}``, ``tickguard_positions_open{symbol}``
- ``tickguard_closes_total{reason}`` (committed closes; every reason is always present)
- ``tickguard_ws_sessions``, ``tickguard_ws_dropped_slow_total``
- ``tickguard_db_errors_total``, ``tickguard_persistence_transactions_total``
- ``tickguard_recovery_gaps_total{outcome}`` (recovered or abandoned: flagged, not judged),
  ``tickguard_recovery_trades_total``, ``tickguard_recovery_requests_total``,
  ``tickguard_recovery_retries_total``, ``tickguard_recovery_candles_total`` (gap recovery over
  REST, issue 14); ``tickguard_recovery_unjudged_gaps_total{symbol,reason}`` (gaps flagged and
  not judged: ``too_long`` past RECOVERY_MAX_GAP_S, ``gave_up``, ``refused``, ``unlisted``) and
  ``tickguard_recovery_unjudged_gap_seconds{symbol}`` (the time span of the last one)

A source the app was not given (e.g. a test app without actors) is left out, not reported 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from quart import Blueprint, Response, current_app, request
from quart.blueprints import BlueprintSetupState

from tickguard.web.isolation import ConnectionFailures
from tickguard.web.services import AppServices, WsStats, services_of

if TYPE_CHECKING:  # the counters' types only: web reads them, never imports the actors' code
    from tickguard.actors.engine import EngineStats
    from tickguard.actors.fanout import FanoutStats
    from tickguard.actors.follower import FollowerStats
    from tickguard.actors.lease import LeaseStats
    from tickguard.actors.persistence import PersistenceStats
    from tickguard.actors.recovery import RecoveryStats

REGISTRY = "tickguard.metrics"
CLOSE_REASONS = ("take_profit", "stop_loss", "manual", "system")


@attrs.frozen
class MetricsSources:
    """The actors' stats objects /metrics reads (the feed's comes from ``AppServices``).

    ``engines`` is the live per-symbol mapping the engine directory fills as engines start.
    """

    engines: Mapping[str, EngineStats] = attrs.field(factory=dict)
    persistence: PersistenceStats | None = None
    fanout: FanoutStats | None = None
    recovery: RecoveryStats | None = None
    # Split roles (issue 17): the engine lease and the event-log followers (by role).
    lease: LeaseStats | None = None
    followers: Mapping[str, FollowerStats] = attrs.field(factory=dict)


class TickguardCollector(Collector):
    """Builds tickguard's metric families from ``services`` each time it is collected."""

    def __init__(self, services: AppServices) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        yield from self._feed()
        sources = self.services.metrics
        if isinstance(sources, MetricsSources):
            yield from _engines(sources.engines)
            if sources.persistence is not None:
                yield from _persistence(sources.persistence)
            if sources.fanout is not None:
                yield from _fanout(sources.fanout)
            if sources.recovery is not None:
                yield from _recovery(sources.recovery)
            if sources.lease is not None:
                yield from _lease(sources.lease)
            if sources.followers:
                yield from _followers(sources.followers)
            yield from _edge(self.services.ws_stats)

    def _feed(self) -> Iterator[Metric]:
        if self.services.feed_status is None:
            return
        snapshot: dict[str, Any] = self.services.feed_status.snapshot()
        products: dict[str, dict[str, Any]] = snapshot.get("products", {})
        ticks = CounterMetricFamily(
            "tickguard_feed_ticks", "Tickers received per symbol.", labels=["symbol"]
        )
        missed = CounterMetricFamily(
            "tickguard_feed_missed_trades",
            "Trades skipped between two tickers (trade id gaps) per symbol.",
            labels=["symbol"],
        )
        live = GaugeMetricFamily(
            "tickguard_feed_product_live",
            "1 while the symbol's feed is live, 0 when connecting, stale or rejected.",
            labels=["symbol"],
        )
        halted = GaugeMetricFamily(
            "tickguard_feed_product_halted",
            "1 while Coinbase's status channel says the symbol is not trading (nothing triggers).",
            labels=["symbol"],
        )
        for symbol, product in sorted(products.items()):
            ticks.add_metric([symbol], product.get("ticks", 0))
            missed.add_metric([symbol], product.get("missed_trades", 0))
            live.add_metric([symbol], 1 if product.get("state") == "live" else 0)
            halted.add_metric([symbol], 1 if product.get("trading") == "halted" else 0)
        yield ticks
        yield missed
        yield live
        yield halted
        yield GaugeMetricFamily(
            "tickguard_feed_connected",
            "1 while the Coinbase connection is up.",
            value=1 if snapshot.get("connected") else 0,
        )
        yield CounterMetricFamily(
            "tickguard_feed_reconnects",
            "Coinbase connections re-established after a loss.",
            value=snapshot.get("reconnects", 0),
        )
        yield CounterMetricFamily(
            "tickguard_feed_malformed",
            "Feed messages that could not be parsed, skipped.",
            value=snapshot.get("malformed", 0),
        )


def _engines(engines: Mapping[str, EngineStats]) -> Iterator[Metric]:
    latency = GaugeMetricFamily(
        "tickguard_engine_window_seconds",
        "Time the symbol's engine spent judging its last window.",
        labels=["symbol"],
    )
    windows = CounterMetricFamily(
        "tickguard_engine_windows", "Windows judged per symbol.", labels=["symbol"]
    )
    open_positions = GaugeMetricFamily(
        "tickguard_positions_open",
        "Open positions the symbol's engine watches.",
        labels=["symbol"],
    )
    # A copy: the mapping grows when an engine starts (not during this synchronous read, but
    # a copy keeps that reasoning local).
    for symbol, stats in sorted(dict(engines).items()):
        if stats.last_window_latency_s is not None:
            latency.add_metric([symbol], stats.last_window_latency_s)
        windows.add_metric([symbol], stats.windows_judged)
        open_positions.add_metric([symbol], stats.positions_open)
    yield latency
    yield windows
    yield open_positions


def _persistence(stats: PersistenceStats) -> Iterator[Metric]:
    closes = CounterMetricFamily(
        "tickguard_closes", "Positions closed (committed), by reason.", labels=["reason"]
    )
    by_reason = dict.fromkeys(CLOSE_REASONS, 0) | stats.closes_by_reason
    for reason, count in sorted(by_reason.items()):
        closes.add_metric([reason], count)
    yield closes
    yield CounterMetricFamily(
        "tickguard_db_errors",
        "Database operations of the persistence actor that failed (unavailable).",
        value=stats.db_errors,
    )
    yield CounterMetricFamily(
        "tickguard_writes_rejected",
        "Requests the writer answered as failed on their own (nothing written; others unharmed).",
        value=stats.rejected,
    )
    yield CounterMetricFamily(
        "tickguard_persistence_transactions",
        "Transactions the persistence actor committed.",
        value=stats.transactions,
    )
    yield CounterMetricFamily(
        "tickguard_closes_fenced",
        "Engine closes refused because this process no longer held the lease with their token.",
        value=stats.closes_fenced,
    )
    yield CounterMetricFamily(
        "tickguard_watermarks_fenced",
        "Watermark advances refused because the lease was no longer held with their token.",
        value=stats.watermarks_fenced,
    )


def _lease(stats: LeaseStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "tickguard_engine_lease_partitions_held",
        "Engine lease partitions this process holds now (its share; 1 = the leader, with one).",
        value=len(stats.held),
    )
    yield _by_label(
        "tickguard_engine_lease_changes",
        "Engine lease partitions acquired and lost by this process.",
        "change",
        {"acquired": stats.acquired, "lost": stats.lost},
    )
    yield CounterMetricFamily(
        "tickguard_engine_lease_renew_failures",
        "Lease renewals that failed (database away or too slow).",
        value=stats.renew_failures,
    )
    if stats.members is not None:
        yield GaugeMetricFamily(
            "tickguard_engine_members",
            "Live engine processes the balancer counted at its last survey (issue 18).",
            value=stats.members,
        )


def _followers(followers: Mapping[str, FollowerStats]) -> Iterator[Metric]:
    events = CounterMetricFamily(
        "tickguard_log_follower_events",
        "Events read from the event log, by the role that follows it.",
        labels=["role"],
    )
    lag = GaugeMetricFamily(
        "tickguard_log_follower_lag_seconds",
        "Seconds since the follower last had read the whole log (grows through an outage).",
        labels=["role"],
    )
    for role, stats in sorted(followers.items()):
        events.add_metric([role], stats.events)
        lag.add_metric([role], stats.lag_s if stats.lag_s is not None else float("nan"))
    yield events
    yield lag


def _by_label(name: str, help_text: str, label: str, counts: dict[str, int]) -> Metric:
    """One counter family with a sample per value of its one label."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _recovery(stats: RecoveryStats) -> Iterator[Metric]:
    yield _by_label(
        "tickguard_recovery_gaps",
        "Feed gaps by outcome: recovered over REST, or abandoned (flagged in the log, not judged).",
        "outcome",
        {"recovered": stats.recovered, "abandoned": stats.abandoned},
    )
    yield CounterMetricFamily(
        "tickguard_recovery_trades",
        "Missed trades fetched over REST and judged.",
        value=stats.trades,
    )
    yield CounterMetricFamily(
        "tickguard_recovery_requests",
        "Requests of gap recoveries (REST pages and watermark reads), retries included.",
        value=stats.requests,
    )
    yield CounterMetricFamily(
        "tickguard_recovery_retries",
        "Recovery requests that failed (429, 5xx, network, bad body) and were retried.",
        value=stats.retries,
    )
    yield CounterMetricFamily(
        "tickguard_recovery_candles",
        "1-minute candles judged in gaps too long to page through in trades.",
        value=stats.candles,
    )
    unjudged = CounterMetricFamily(
        "tickguard_recovery_unjudged_gaps",
        "Feed gaps flagged and not judged, per symbol and reason (too_long: RECOVERY_MAX_GAP_S).",
        labels=["symbol", "reason"],
    )
    for (symbol, reason), count in sorted(dict(stats.unjudged_counts).items()):
        unjudged.add_metric([symbol, reason], count)
    yield unjudged
    span = GaugeMetricFamily(
        "tickguard_recovery_unjudged_gap_seconds",
        "Time span of the symbol's last gap flagged and not judged (when known).",
        labels=["symbol"],
    )
    for symbol, gap in sorted(dict(stats.unjudged).items()):
        if gap.seconds is not None:
            span.add_metric([symbol], gap.seconds)
    yield span


def recovery_report(services: AppServices) -> dict[str, Any] | None:
    """What /ready shows of gap recovery: per symbol, the last gap flagged and not judged
    (None when the app has no recovery)."""
    sources = services.metrics
    if not isinstance(sources, MetricsSources) or sources.recovery is None:
        return None
    return {"unjudged_gaps": sources.recovery.unjudged_report()}


def _fanout(stats: FanoutStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "tickguard_ws_sessions", "Open WebSocket sessions.", value=stats.sessions
    )
    yield CounterMetricFamily(
        "tickguard_ws_dropped_slow",
        "WebSocket sessions closed with 1013 because their queue overflowed.",
        value=stats.dropped_slow,
    )


def _edge(ws: WsStats) -> Iterator[Metric]:
    """What the edge refused or contained: bad /ws handshakes and frames, failed connections."""
    yield _by_label(
        "tickguard_ws_handshakes",
        "WebSocket handshakes by outcome (opened, or rejected for a bad userId).",
        "outcome",
        {"opened": ws.opened, "rejected": ws.rejected},
    )
    yield _by_label(
        "tickguard_ws_client_frames_refused",
        "Client WebSocket frames ignored (unknown or malformed) or too big (closed with 1009).",
        "why",
        {"ignored": ws.ignored_frames, "too_big": ws.too_big},
    )
    yield CounterMetricFamily(
        "tickguard_http_connections_failed",
        "Connections that ended with an error inside the HTTP server, contained to themselves.",
        value=ConnectionFailures.count,
    )


def registry_for(services: AppServices) -> CollectorRegistry:
    """A new registry holding only tickguard's collector for ``services``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TickguardCollector(services))
    return registry


metrics = Blueprint("metrics", __name__)


@metrics.record_once
def _install(state: BlueprintSetupState) -> None:
    app = state.app
    app.extensions[REGISTRY] = registry_for(services_of(app))


@metrics.get("/metrics")
async def scrape() -> Response:
    """The metrics in the format the scraper's ``Accept`` asks for (Prometheus text by
    default, OpenMetrics when asked), as prometheus-client's own exporters answer."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(current_app.extensions[REGISTRY])
    return Response(body, status=200, content_type=content_type)
