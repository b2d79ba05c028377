"""The product catalog: Coinbase's list of products, read from ``GET {COINBASE_REST_URL}/products``
and read again every ``PRODUCTS_REFRESH_S``, so that a made-up symbol is refused before anything
is subscribed (no subscribe sent, no per-product feed state, no log line per symbol).

``ProductCatalog`` is the list as last read (written only by ``run``, read by the web layer);
``run`` is the supervised child that keeps it fresh. Until a read has succeeded the catalog
knows nothing (``known`` answers None) and symbols are decided by the feed, as before.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import attrs
import httpx
import trio

from tickguard.actors.backoff import full_jitter

log = logging.getLogger(__name__)

USER_AGENT = "tickguard"  # Coinbase answers 400 to requests without a User-Agent


@attrs.frozen
class CatalogConfig:
    """Where the list is read and how often (seconds)."""

    rest_url: str = "https://api.exchange.coinbase.com"
    refresh_s: float = 3600.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    request_timeout_s: float = 10.0
    seed: int | None = None  # reproducible backoff jitter in tests


class CatalogUnreadable(Exception):
    """The product list could not be read or understood (the message says why).
    ``retry_after`` is the server's ``Retry-After`` in seconds (0 when it gave none)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProductCatalog:
    """The product ids Coinbase lists, with their status; empty until the first read."""

    def __init__(self) -> None:
        self._status: dict[str, str] | None = None
        self.reads = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._status is not None

    def known(self, symbol: str) -> bool | None:
        """True if Coinbase lists ``symbol``, False if not, None while the list was never read."""
        if self._status is None:
            return None
        return symbol in self._status

    def status(self, symbol: str) -> str | None:
        """The listed product's status (``online``, ``offline``, ``delisted``...), or None."""
        return None if self._status is None else self._status.get(symbol)

    def replace(self, products: Iterable[tuple[str, str]]) -> None:
        """Take a freshly read list of ``(id, status)``."""
        self._status = dict(products)
        self.reads += 1
        self.last_error = None

    def __len__(self) -> int:
        return 0 if self._status is None else len(self._status)


def parse_products(payload: Any) -> list[tuple[str, str]]:
    """``(id, status)`` of each product in a GET /products answer; CatalogUnreadable if it is
    not a list of objects with a string ``id``."""
    if not isinstance(payload, list):
        raise CatalogUnreadable("GET /products did not answer a list")
    products = []
    for item in payload:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise CatalogUnreadable("GET /products listed an entry without a string id")
        products.append((item["id"], str(item.get("status", "online"))))
    return products


async def fetch_products(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """One read of ``GET /products``. Raises ``CatalogUnreadable`` (a non-200 answer, bad
    JSON, a bad shape) or ``httpx.HTTPError`` (connection, timeout)."""
    response = await client.get("/products")
    if response.status_code != 200:
        raw = response.headers.get("Retry-After", "")
        raise CatalogUnreadable(
            f"GET /products answered {response.status_code}",
            retry_after=float(raw) if raw.isdigit() else 0.0,
        )
    try:
        payload = response.json()
    except ValueError as exc:
        raise CatalogUnreadable(f"GET /products answered invalid JSON: {exc}") from None
    return parse_products(payload)


async def run(
    config: CatalogConfig,
    catalog: ProductCatalog,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read the product list now and every ``refresh_s``; after a failed read, retry with
    exponential backoff and full jitter (at least the server's ``Retry-After``). Started at
    once (start-up never waits for Coinbase); runs until cancelled; never raises for a
    network or server failure."""
    rng = random.Random(config.seed)
    failed_in_a_row = 0
    async with httpx.AsyncClient(
        base_url=config.rest_url,
        timeout=config.request_timeout_s,
        headers={"User-Agent": USER_AGENT},
    ) as client:
        task_status.started()
        while True:
            try:
                products = await fetch_products(client)
            except (httpx.HTTPError, CatalogUnreadable) as exc:
                catalog.failures += 1
                catalog.last_error = f"{type(exc).__name__}: {exc}"
                # One warning per outage, not one per retry.
                level = logging.WARNING if failed_in_a_row == 0 else logging.DEBUG
                log.log(level, "products: cannot read %s/products (%s)", config.rest_url, exc)
                delay = full_jitter(failed_in_a_row, config.retry_base_s, config.retry_max_s, rng)
                failed_in_a_row += 1
                retry_after = exc.retry_after if isinstance(exc, CatalogUnreadable) else 0.0
                await trio.sleep(max(delay, retry_after))
                continue
            if failed_in_a_row or not catalog.loaded:
                log.info("products: %d listed by %s", len(products), config.rest_url)
            failed_in_a_row = 0
            catalog.replace(products)
            await trio.sleep(config.refresh_s)
