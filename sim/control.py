"""The simulator's control channel: ``POST /control {"op": ..., ...}``.

Each op names its arguments (``?`` marks an optional one, with its default); ``{"op": "help"}``
lists them. ``apply`` raises ``ValueError`` for an unknown op or a bad argument, which the
HTTP side answers 400.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import attrs

from tickguard.sim import paths
from tickguard.sim.paths import PricePath
from tickguard.sim.rest_faults import RestFault
from tickguard.sim.wire import parse_time

if TYPE_CHECKING:
    from tickguard.sim.server import Simulator

Result = dict[str, Any]


@attrs.frozen
class Op:
    """One control op: what it does, its arguments, and how it is applied."""

    summary: str
    arguments: tuple[str, ...]
    run: Callable[[Simulator, Mapping[str, Any]], Result]


def _ok(**fields: Any) -> Result:
    return {"ok": True, **fields}


def _product(sim: Simulator, command: Mapping[str, Any]) -> str:
    product = str(command["product"])
    if product not in sim.products:
        raise ValueError(f"unknown product {product!r}")
    return product


def _publish(sim: Simulator, command: Mapping[str, Any]) -> Result:
    time = command.get("time")
    at: datetime | None = parse_time(str(time)) if time else None
    return _ok(trade_id=sim.publish(_product(sim, command), str(command["price"]), time=at))


def _blast(sim: Simulator, command: Mapping[str, Any]) -> Result:
    product = _product(sim, command)
    market = sim.products[product]
    start = Decimal(str(command.get("start", market.price)))
    step = Decimal(str(command.get("step", "0.01")))
    # A saw-tooth around start, so that low/high keep moving.
    prices = [start + step * (i % 200 - 100) for i in range(int(command["count"]))]
    sim.blast_in_background(product, prices)  # the HTTP answer does not wait for the burst
    return _ok(frames=len(prices))


def _path(sim: Simulator, command: Mapping[str, Any]) -> Result:
    product = _product(sim, command)
    market = sim.products[product]
    kind = command.get("kind", "script")
    start = Decimal(str(command.get("start", market.price)))
    new: PricePath
    if kind == "walk":
        volatility = command.get("volatility")
        new = paths.walk(
            start,
            seed=int(command.get("seed", 0)),
            volatility=Decimal(str(volatility)) if volatility is not None else sim.volatility,
        )
    elif kind == "script":
        new = paths.script(str(p) for p in command["prices"])
    elif kind == "jump":
        new = paths.jump(start, Decimal(str(command["to"])), after=int(command.get("after", 1)))
    else:
        raise ValueError(f"unknown path kind {kind!r} (walk, script or jump)")
    sim.set_path(product, new)
    return _ok()


def _skip(sim: Simulator, command: Mapping[str, Any]) -> Result:
    prices = command.get("prices")
    last = sim.skip_trade_ids(
        _product(sim, command),
        int(command.get("count", len(prices) if prices else 0)),
        prices=[Decimal(str(p)) for p in prices] if prices else None,
    )
    return _ok(last_trade_id=last)


def _rest_fault(sim: Simulator, command: Mapping[str, Any]) -> Result:
    fault = RestFault.from_command(command)
    sim.rest_faults.add(fault)
    return _ok(pending=len(sim.rest_faults))


def _raw_bytes(sim: Simulator, command: Mapping[str, Any]) -> Result:
    return _ok(sent=sim.send_bytes(bytes.fromhex(str(command["hex"]))))


def _stall(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.stall(float(command["seconds"]))
    return _ok()


def _delay_acks(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.delay_acks(float(command["seconds"]))
    return _ok()


def _refuse(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.refuse_connections(float(command["seconds"]))
    return _ok()


def _rate(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.set_rate(float(command["rate"]))
    return _ok()


def _add_product(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.add_product(str(command["product"]), str(command["price"]))
    return _ok()


def _rest_clear(sim: Simulator, command: Mapping[str, Any]) -> Result:
    sim.rest_faults.clear()
    return _ok()


def _set_status(online: bool) -> Callable[[Simulator, Mapping[str, Any]], Result]:
    def run(sim: Simulator, command: Mapping[str, Any]) -> Result:
        return _ok(sent=sim.set_trading(_product(sim, command), online=online))

    return run


OPS: dict[str, Op] = {
    "help": Op("this list", (), lambda sim, c: _ok(ops=describe())),
    "stats": Op("the counters (also GET /stats)", (), lambda sim, c: _ok(stats=sim.stats())),
    "drop": Op(
        "drop every WebSocket at the TCP level (no close frame)",
        (),
        lambda sim, c: _ok(dropped=sim.drop_all()),
    ),
    "stall": Op(
        "open WebSockets send nothing (heartbeats and acks included) for a while",
        ("seconds",),
        _stall,
    ),
    "malformed": Op(
        "send malformed messages (bad JSON, wrong types, missing fields)",
        ("count?=1",),
        lambda sim, c: _ok(sent=sim.send_malformed(int(c.get("count", 1)))),
    ),
    "unknown": Op(
        "send well-formed messages of types a ticker client does not use",
        ("count?=1",),
        lambda sim, c: _ok(sent=sim.send_unknown(int(c.get("count", 1)))),
    ),
    "raw": Op(
        "send one text frame with this text",
        ("text",),
        lambda s, c: _ok(sent=s.send_raw(str(c["text"]))),
    ),
    "raw_bytes": Op(
        "write these bytes (hex) on every WebSocket as they are (bad frames, bad opcodes...)",
        ("hex",),
        _raw_bytes,
    ),
    "skip_trades": Op(
        "trades happen without a ticker (heartbeats and REST show them); prices default to "
        "the last price",
        ("product", "count?=len(prices)", "prices?"),
        _skip,
    ),
    "delay_acks": Op(
        "answer each later (un)subscribe this late (0 restores prompt acks)",
        ("seconds",),
        _delay_acks,
    ),
    "refuse": Op(
        "refuse WebSocket handshakes with 503 for a while (HTTP still answers)",
        ("seconds",),
        _refuse,
    ),
    "publish": Op("one trade now, ticker to subscribers", ("product", "price", "time?"), _publish),
    "path": Op(
        "where the product's next prices come from",
        (
            "product",
            "kind?=script (walk|script|jump)",
            "start?=last price",
            "prices (script)",
            "to (jump)",
            "after?=1 (jump)",
            "seed?=0 (walk)",
            "volatility?=--volatility (walk)",
        ),
        _path,
    ),
    "rate": Op(
        "ticks per second per product (0 stops automatic ticks)",
        ("rate",),
        _rate,
    ),
    "add_product": Op(
        "serve one more product",
        ("product", "price"),
        _add_product,
    ),
    "blast": Op(
        "send count tickers as fast as the sockets take them (in the background)",
        ("product", "count", "start?=last price", "step?=0.01"),
        _blast,
    ),
    "halt": Op(
        "the product goes offline with trading disabled (status channel and GET /products)",
        ("product",),
        _set_status(online=False),
    ),
    "resume": Op("the product is online and trading again", ("product",), _set_status(True)),
    "rest_fault": Op(
        "the next REST market-data answers misbehave: slow (seconds), 429 (retry_after), "
        "5xx (status), truncate (body cut short, connection dropped)",
        ("kind", "count?=1", "seconds?=1 (slow)", "retry_after?=1 (429)", "status?=503 (5xx)"),
        _rest_fault,
    ),
    "rest_clear": Op(
        "forget pending REST faults",
        (),
        _rest_clear,
    ),
}


def describe() -> list[dict[str, Any]]:
    """Every op with its summary and arguments, as ``{"op": "help"}`` answers."""
    return [
        {"op": name, "summary": op.summary, "arguments": list(op.arguments)}
        for name, op in OPS.items()
    ]


def apply(sim: Simulator, command: Mapping[str, Any]) -> Result:
    """Apply one command; ``ValueError`` names what is wrong with it."""
    if not isinstance(command, Mapping):
        raise ValueError('a command is a JSON object {"op": ...}')
    name = command.get("op")
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None:
        raise ValueError(f'unknown op {name!r}: {{"op": "help"}} lists them')
    try:
        return op.run(sim, command)
    except (KeyError, TypeError, InvalidOperation, OverflowError) as exc:
        raise ValueError(f"bad {name} command: {exc!r}") from exc
