"""tickguard's configuration: read once from the environment and a ``.env`` file, validated,
and handed down as one frozen ``Settings`` value.

This is the only module that reads environment variables; everything else receives
``Settings``. A bad value stops start-up with a ``ConfigError`` that names the variable.
The variables and their defaults are DESIGN.md's Configuration table; ``deploy/.env.example``
lists exactly ``KNOWN_VARIABLES``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
from dotenv import dotenv_values

KNOWN_VARIABLES: tuple[str, ...] = (
    "PORT",
    "HOST",
    "DATABASE_URL",
    "TICKGUARD_DATA_DIR",
    "CORS_ORIGIN",
    "COINBASE_WS_URL",
    "COINBASE_PRODUCTS",
    "COINBASE_REST_URL",
    "PRODUCTS_REFRESH_S",
    "WS_RECONNECT_BASE_MS",
    "WS_RECONNECT_MAX_MS",
    "WS_HEARTBEAT_TIMEOUT_MS",
    "MAX_OPEN_POSITIONS_PER_USER",
    "SHUTDOWN_GRACE_MS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "AUTH_JWKS_URL",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
    "AUTH_CLOCK_SKEW_SECONDS",
    "AUTH_JWKS_CACHE_TTL_MS",
    "ALLOW_UNAUTHENTICATED",
    "RATE_LIMIT_PER_USER",
    "RATE_LIMIT_PER_ADDRESS",
    "WS_CONNECTS_PER_ADDRESS_PER_MIN",
    "GAP_FILL",
    "RECOVERY_MAX_GAP_S",
    "EVENT_RETENTION_DAYS",
    "TICKGUARD_ROLE",
    "REDIS_URL",
    "API_WORKERS",
    "ENGINE_LEASE_TTL_MS",
    "ENGINE_PARTITIONS",
    "ENGINE_ID",
)

# The roles one process can play (issue 17); "all" is every one of them in one process.
ROLES: tuple[str, ...] = ("api", "engine", "gateway")

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
# A stop crossed during a gap closes at its level, or at the first recovered trade beyond it.
GAP_FILLS: tuple[str, ...] = ("level", "trade")
# RECOVERY_MAX_GAP_S: at most a year (a gap that long is an outage no recovery should replay).
_MAX_GAP_S = 366 * 86_400

# A millisecond setting beyond a day is a typo (seconds written as ms twice, an extra zero...).
_MAX_MS = 86_400_000

_INTEGER = re.compile(r"-?[0-9]+")
_PRODUCT = re.compile(r"[A-Z0-9]+-[A-Z0-9]+")
# An Origin header is scheme://host[:port], nothing more: a path or trailing slash never matches.
_ORIGIN = re.compile(
    r"https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:(?P<port>[0-9]+))?"
)

# RFC 1123 labels (letters, digits, inner hyphens; underscores too, as container and compose
# service names use them), at most 63 characters each, an optional final dot.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
# All digits and dots is an IPv4 address or nothing (a bad one, not a host name).
_NUMERIC = re.compile(r"[0-9.]+")
_HOST_AND_PORT = re.compile(r"(\[[^]]*\]|[^:]*):[0-9]+")

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration values are invalid; each problem names its variable.

    ``problems`` holds one message per bad variable; ``str()`` joins them, one per line.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = tuple(problems)


def _redact_url(url: str | None) -> str:
    return "None" if url is None else repr(_url_without_password(url))


@attrs.frozen
class Settings:
    """The validated configuration, one value for the whole process.

    ``database_url`` None means "start the embedded PostgreSQL in ``data_dir``". Its repr
    never shows the database password, so a logged ``Settings`` leaks no secret.
    """

    port: int = 8080
    host: str = "127.0.0.1"
    database_url: str | None = attrs.field(default=None, repr=_redact_url)
    data_dir: Path = attrs.field(factory=lambda: _default_data_dir({}))
    cors_origins: tuple[str, ...] = ("http://localhost:5173",)
    coinbase_ws_url: str = "wss://ws-feed.exchange.coinbase.com"
    coinbase_products: tuple[str, ...] = ("BTC-USD",)
    coinbase_rest_url: str = "https://api.exchange.coinbase.com"
    products_refresh_s: int = 3600
    ws_reconnect_base_ms: int = 1000
    ws_reconnect_max_ms: int = 30000
    ws_heartbeat_timeout_ms: int = 5000
    max_open_positions_per_user: int = 1000
    shutdown_grace_ms: int = 10000
    log_level: str = "info"
    log_format: str = "text"
    # Identity (docs/SECURITY.md): no JWKS URL means no authentication.
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: tuple[str, ...] = ()
    auth_clock_skew_seconds: int = 30
    auth_jwks_cache_ttl_ms: int = 300000
    allow_unauthenticated: bool = False
    # Token buckets (web/ratelimit.py); 0 turns a limit off.
    rate_limit_per_user: int = 20
    rate_limit_per_address: int = 100
    ws_connects_per_address_per_min: int = 120
    # Market-data recovery (issue 14).
    gap_fill: str = "level"
    recovery_max_gap_s: int = 604_800  # a longer gap is flagged and not judged (7 days)
    # Event log (issue 17): events of positions closed longer ago may be pruned; 0 = keep all.
    event_retention_days: int = 30
    # Roles (issue 17, docs/SCALING.md): what this process runs; all three is today's process.
    roles: tuple[str, ...] = ROLES
    redis_url: str | None = attrs.field(default=None, repr=_redact_url)
    api_workers: int = 1
    engine_lease_ttl_ms: int = 5000
    engine_partitions: int = 64
    engine_id: str | None = None  # the lease owner's name; default host:pid

    @property
    def split(self) -> bool:
        """This process plays only some roles: the others run elsewhere (Redis, a shared
        PostgreSQL)."""
        return set(self.roles) != set(ROLES)

    def plays(self, role: str) -> bool:
        return role in self.roles

    def describe_database(self) -> str:
        """Where the data lives, safe to log: the URL without its password, or the embedded
        server's directory."""
        if self.database_url is None:
            return f"embedded PostgreSQL in {self.data_dir}"
        return _url_without_password(self.database_url)


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> Settings:
    """Read and validate every variable of ``KNOWN_VARIABLES``.

    ``environ`` defaults to the process environment; ``env_file`` (skipped when None or
    missing) supplies values the environment does not set — the real environment wins.
    An empty value counts as unset and takes the default. ``.env`` values are taken
    literally (no ``${VAR}`` interpolation). Raises ``ConfigError`` listing every bad
    variable; never returns a partly valid ``Settings``.
    """
    if environ is None:
        environ = os.environ
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        for key, value in dotenv_values(env_file, interpolate=False).items():
            if value is not None:
                merged[key] = value
    merged.update(environ)
    return _Reader(merged).settings()


class _Reader:
    """Parses one merged mapping into ``Settings``, collecting every problem before raising."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        self._problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self._values.get(name, "").strip()
        return value or None

    def _get(self, name: str, default: T, parse: Callable[[str, str], T]) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return parse(name, raw)
        except _Invalid as problem:
            self._problems.append(str(problem))
            return default

    def settings(self) -> Settings:
        defaults = Settings(data_dir=_default_data_dir(self._values))
        base = self._get("WS_RECONNECT_BASE_MS", defaults.ws_reconnect_base_ms, _milliseconds)
        most = self._get("WS_RECONNECT_MAX_MS", defaults.ws_reconnect_max_ms, _milliseconds)
        settings = Settings(
            port=self._get("PORT", defaults.port, _port),
            host=self._get("HOST", defaults.host, _host),
            database_url=self._get("DATABASE_URL", defaults.database_url, _database_url),
            data_dir=self._get("TICKGUARD_DATA_DIR", defaults.data_dir, _directory),
            cors_origins=self._get("CORS_ORIGIN", defaults.cors_origins, _origins),
            coinbase_ws_url=self._get("COINBASE_WS_URL", defaults.coinbase_ws_url, _ws_url),
            coinbase_products=self._get("COINBASE_PRODUCTS", defaults.coinbase_products, _products),
            coinbase_rest_url=self._get("COINBASE_REST_URL", defaults.coinbase_rest_url, _http_url),
            products_refresh_s=self._get(
                "PRODUCTS_REFRESH_S", defaults.products_refresh_s, _refresh_seconds
            ),
            ws_reconnect_base_ms=base,
            ws_reconnect_max_ms=most,
            ws_heartbeat_timeout_ms=self._get(
                "WS_HEARTBEAT_TIMEOUT_MS", defaults.ws_heartbeat_timeout_ms, _milliseconds
            ),
            max_open_positions_per_user=self._get(
                "MAX_OPEN_POSITIONS_PER_USER", defaults.max_open_positions_per_user, _cap
            ),
            shutdown_grace_ms=self._get(
                "SHUTDOWN_GRACE_MS", defaults.shutdown_grace_ms, _milliseconds
            ),
            log_level=self._get("LOG_LEVEL", defaults.log_level, _choice(LOG_LEVELS)),
            log_format=self._get("LOG_FORMAT", defaults.log_format, _choice(LOG_FORMATS)),
            gap_fill=self._get("GAP_FILL", defaults.gap_fill, _choice(GAP_FILLS)),
            recovery_max_gap_s=self._get(
                "RECOVERY_MAX_GAP_S", defaults.recovery_max_gap_s, _gap_seconds
            ),
            event_retention_days=self._get(
                "EVENT_RETENTION_DAYS", defaults.event_retention_days, _retention_days
            ),
        )
        settings = self._with_identity(settings, defaults)
        settings = self._with_roles(settings, defaults)
        if base > most:
            self._problems.append(
                f"WS_RECONNECT_BASE_MS ({base}) must not exceed WS_RECONNECT_MAX_MS ({most})"
            )
        self._check_exposure(settings)
        if self._problems:
            raise ConfigError(self._problems)
        return settings

    def _with_identity(self, settings: Settings, defaults: Settings) -> Settings:
        """``settings`` with the authentication and rate-limit variables read."""
        return attrs.evolve(
            settings,
            auth_jwks_url=self._get("AUTH_JWKS_URL", defaults.auth_jwks_url, _jwks_url),
            auth_issuer=self._get("AUTH_ISSUER", defaults.auth_issuer, _claim_text),
            auth_audience=self._get("AUTH_AUDIENCE", defaults.auth_audience, _audiences),
            auth_clock_skew_seconds=self._get(
                "AUTH_CLOCK_SKEW_SECONDS", defaults.auth_clock_skew_seconds, _skew
            ),
            auth_jwks_cache_ttl_ms=self._get(
                "AUTH_JWKS_CACHE_TTL_MS", defaults.auth_jwks_cache_ttl_ms, _milliseconds
            ),
            allow_unauthenticated=self._get(
                "ALLOW_UNAUTHENTICATED", defaults.allow_unauthenticated, _boolean
            ),
            rate_limit_per_user=self._get(
                "RATE_LIMIT_PER_USER", defaults.rate_limit_per_user, _limit
            ),
            rate_limit_per_address=self._get(
                "RATE_LIMIT_PER_ADDRESS", defaults.rate_limit_per_address, _limit
            ),
            ws_connects_per_address_per_min=self._get(
                "WS_CONNECTS_PER_ADDRESS_PER_MIN", defaults.ws_connects_per_address_per_min, _limit
            ),
        )

    def _with_roles(self, settings: Settings, defaults: Settings) -> Settings:
        """``settings`` with the role variables read; a split process needs Redis and a shared
        PostgreSQL (the embedded one lives inside one process)."""
        settings = attrs.evolve(
            settings,
            roles=self._get("TICKGUARD_ROLE", defaults.roles, _roles),
            redis_url=self._get("REDIS_URL", defaults.redis_url, _redis_url),
            api_workers=self._get("API_WORKERS", defaults.api_workers, _workers),
            engine_lease_ttl_ms=self._get(
                "ENGINE_LEASE_TTL_MS", defaults.engine_lease_ttl_ms, _lease_ttl
            ),
            engine_partitions=self._get(
                "ENGINE_PARTITIONS", defaults.engine_partitions, _partitions
            ),
            engine_id=self._get("ENGINE_ID", defaults.engine_id, _claim_text),
        )
        if settings.split:
            roles = ",".join(settings.roles)
            if settings.redis_url is None:
                self._problems.append(
                    f"TICKGUARD_ROLE={roles} runs part of tickguard in this process: set REDIS_URL "
                    "(e.g. redis://127.0.0.1:6379/0) so the processes can wake each other"
                )
            if settings.database_url is None:
                self._problems.append(
                    f"TICKGUARD_ROLE={roles} runs part of tickguard in this process: set "
                    "DATABASE_URL to the PostgreSQL every process shares (the embedded one "
                    "belongs to a single process)"
                )
        if settings.api_workers > 1 and not settings.plays("api"):
            self._problems.append("API_WORKERS above 1 needs the api role (TICKGUARD_ROLE)")
        return settings

    def _check_exposure(self, settings: Settings) -> None:
        # Without authentication anyone who reaches the port acts as any user: only loopback
        # keeps that to this machine, unless the operator says in so many words it is fine.
        if (
            self._raw("AUTH_JWKS_URL") is None
            and not settings.allow_unauthenticated
            and not is_loopback_host(settings.host)
        ):
            self._problems.append(
                f"HOST {settings.host!r} is not a loopback address and AUTH_JWKS_URL is unset, "
                "so anyone who reaches the port could act as any user: set AUTH_JWKS_URL, "
                "or ALLOW_UNAUTHENTICATED=true to accept that"
            )


class _Invalid(ValueError):
    """One variable's value is invalid; the message names the variable."""


def _integer(name: str, raw: str, low: int, high: int, what: str) -> int:
    # Only plain decimal digits: int() would also take "1_000" and " +5 ", which hide typos.
    if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        raise _Invalid(f"{name} must be {what}, got {raw!r}")
    return int(raw)


def _port(name: str, raw: str) -> int:
    return _integer(name, raw, 1, 65535, "an integer from 1 to 65535")


def _milliseconds(name: str, raw: str) -> int:
    return _integer(name, raw, 1, _MAX_MS, f"a whole number of milliseconds from 1 to {_MAX_MS}")


def _cap(name: str, raw: str) -> int:
    return _integer(name, raw, 1, 2**31 - 1, "an integer of at least 1")


def _host(name: str, raw: str) -> str:
    """A host name, an IPv4 literal or an IPv6 literal (``::1`` or ``[::1]``, kept without
    brackets: the web server adds them when it binds). Anything else would pass here and fail
    later at bind, in a traceback that does not name HOST."""
    literal = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is not None and (literal == raw or address.version == 6):
        return literal
    if _HOSTNAME.fullmatch(raw) and len(raw.rstrip(".")) <= 253 and not _NUMERIC.fullmatch(raw):
        return raw
    hint = ""
    if _HOST_AND_PORT.fullmatch(raw):
        hint = " (set the port with PORT)"
    elif "://" in raw:
        hint = " (no scheme)"
    raise _Invalid(
        f"{name} must be a host name or an IP address (IPv6 as ::1 or [::1]) to bind, "
        f"without port, scheme or path{hint}, got {raw!r}"
    )


def _database_url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
    except ValueError as exc:
        raise _Invalid(f"{name} is not a valid URL ({exc})") from None
    if parts.scheme not in ("postgres", "postgresql"):
        # Never echo the value: it may hold a password.
        raise _Invalid(
            f"{name} must start with postgresql:// or postgres://, got scheme {parts.scheme!r}"
        )
    return raw


def _directory(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise _Invalid(f"{name} must be a directory, got the file {raw!r}")
    # Absolute from here on: the embedded server runs in another working directory.
    return path.absolute()


def _origins(name: str, raw: str) -> tuple[str, ...]:
    items = [item.strip() for item in raw.split(",")]
    if items == ["*"]:
        return ("*",)
    origins: list[str] = []
    for item in items:
        origin = item.lower()
        match = _ORIGIN.fullmatch(origin)
        port = match and match.group("port")
        if not match or (port is not None and not 1 <= int(port) <= 65535):
            raise _Invalid(
                f"{name} must be '*' or comma-separated origins like http://host[:port] "
                f"(no path, no trailing slash), got {item!r}"
            )
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def _ws_url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise _Invalid(f"{name} must be a ws:// or wss:// URL with a host, got {raw!r}")
    return raw


def _http_url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
    ):
        raise _Invalid(
            f"{name} must be an http:// or https:// URL with a host (no query), got {raw!r}"
        )
    return raw.rstrip("/")


def _refresh_seconds(name: str, raw: str) -> int:
    return _integer(name, raw, 1, _MAX_MS // 1000, "a whole number of seconds from 1 to 86400")


def _gap_seconds(name: str, raw: str) -> int:
    return _integer(name, raw, 1, _MAX_GAP_S, f"a whole number of seconds from 1 to {_MAX_GAP_S}")


_MAX_RETENTION_DAYS = 36_500


def _roles(name: str, raw: str) -> tuple[str, ...]:
    items = [item.strip().lower() for item in raw.split(",")]
    if items == ["all"]:
        return ROLES
    if not items or any(item not in ROLES for item in items):
        raise _Invalid(
            f"{name} must be all, or one or more of {', '.join(ROLES)} separated by commas, "
            f"got {raw!r}"
        )
    return tuple(role for role in ROLES if role in items)


def _redis_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise _Invalid(
            f"{name} must be a redis://host:port/db URL, got {_url_without_password(raw)!r}"
        )
    return raw


def _workers(name: str, raw: str) -> int:
    return _integer(name, raw, 1, 64, "an integer from 1 to 64")


def _lease_ttl(name: str, raw: str) -> int:
    return _integer(name, raw, 100, 600_000, "milliseconds from 100 to 600000")


def _partitions(name: str, raw: str) -> int:
    return _integer(name, raw, 1, 4096, "an integer from 1 to 4096")


def _retention_days(name: str, raw: str) -> int:
    what = f"a whole number of days from 0 (keep forever) to {_MAX_RETENTION_DAYS}"
    return _integer(name, raw, 0, _MAX_RETENTION_DAYS, what)


def _products(name: str, raw: str) -> tuple[str, ...]:
    products: list[str] = []
    for item in raw.split(","):
        product = item.strip().upper()
        if not _PRODUCT.fullmatch(product):
            raise _Invalid(
                f"{name} must be comma-separated Coinbase product ids like BTC-USD, got {item!r}"
            )
        if product not in products:
            products.append(product)
    return tuple(products)


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise _Invalid(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    return parse


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only: a loopback
    IP address (127.0.0.0/8, ::1) or ``localhost``. Any other name counts as reachable."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _jwks_url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
        hostname = parts.hostname
    except ValueError:
        parts, hostname = None, None
    if parts is None or not hostname or parts.scheme not in ("https", "http"):
        raise _Invalid(f"{name} must be an https:// URL with a host, got {raw!r}")
    # The keys decide who anyone is: fetched in clear text, anyone on the path could swap them.
    if parts.scheme == "http" and not is_loopback_host(hostname):
        raise _Invalid(f"{name} must use https:// (http:// only for a loopback host), got {raw!r}")
    return raw


def _claim_text(name: str, raw: str) -> str:
    if not all(ch.isprintable() for ch in raw):
        raise _Invalid(f"{name} must be printable text, got {raw!r}")
    return raw


def _audiences(name: str, raw: str) -> tuple[str, ...]:
    audiences: list[str] = []
    for item in raw.split(","):
        audience = item.strip()
        if not audience or not audience.isprintable():
            raise _Invalid(f"{name} must be comma-separated audience values, got {item!r}")
        if audience not in audiences:
            audiences.append(audience)
    return tuple(audiences)


def _skew(name: str, raw: str) -> int:
    return _integer(name, raw, 0, 600, "a whole number of seconds from 0 to 600")


def _limit(name: str, raw: str) -> int:
    return _integer(name, raw, 0, 1_000_000, "an integer from 0 (off) to 1000000")


def _boolean(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise _Invalid(f"{name} must be true or false, got {raw!r}")


def _default_data_dir(values: Mapping[str, str]) -> Path:
    """The user's data directory for tickguard, like platformdirs' ``user_data_path``,
    but read from ``values`` rather than the process environment."""
    home = Path(values.get("HOME") or Path.home())
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "tickguard"
    xdg = values.get("XDG_DATA_HOME", "").strip()
    # The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / "tickguard"


def _url_without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
