"""Configuration: defaults, validation messages that name the variable, .env precedence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tickguard.config import KNOWN_VARIABLES, ConfigError, Settings, load_settings

ENV_EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / ".env.example"


def load(**values: str) -> Settings:
    # A fixed HOME keeps the default data directory independent of the machine.
    return load_settings({"HOME": "/home/alice", **values}, env_file=None)


def test_defaults_match_the_design_table() -> None:
    settings = load()
    assert settings == Settings(
        port=8080,
        host="127.0.0.1",
        database_url=None,
        data_dir=Path("/home/alice/.local/share/tickguard"),
        cors_origins=("http://localhost:5173",),
        coinbase_ws_url="wss://ws-feed.exchange.coinbase.com",
        coinbase_products=("BTC-USD",),
        coinbase_rest_url="https://api.exchange.coinbase.com",
        products_refresh_s=3600,
        ws_reconnect_base_ms=1000,
        ws_reconnect_max_ms=30000,
        ws_heartbeat_timeout_ms=5000,
        max_open_positions_per_user=1000,
        shutdown_grace_ms=10000,
        log_level="info",
        log_format="text",
        auth_jwks_url=None,
        auth_issuer=None,
        auth_audience=(),
        auth_clock_skew_seconds=30,
        auth_jwks_cache_ttl_ms=300000,
        allow_unauthenticated=False,
        rate_limit_per_user=20,
        rate_limit_per_address=100,
        ws_connects_per_address_per_min=120,
        recovery_max_gap_s=604800,
        event_retention_days=30,
    )
    assert settings.describe_database() == (
        "embedded PostgreSQL in /home/alice/.local/share/tickguard"
    )


def test_settings_fields_are_exactly_the_known_variables() -> None:
    renamed = {
        "CORS_ORIGIN": "cors_origins",
        "TICKGUARD_DATA_DIR": "data_dir",
        "TICKGUARD_ROLE": "roles",
    }
    expected = {renamed.get(name, name.lower()) for name in KNOWN_VARIABLES}
    assert {field.name for field in Settings.__attrs_attrs__} == expected


def test_data_dir_respects_xdg_data_home_and_an_explicit_value(tmp_path: Path) -> None:
    assert load(XDG_DATA_HOME="/srv/xdg").data_dir == Path("/srv/xdg/tickguard")
    # A relative XDG_DATA_HOME is invalid per the spec and ignored.
    assert load(XDG_DATA_HOME="rel").data_dir == Path("/home/alice/.local/share/tickguard")
    assert load(TICKGUARD_DATA_DIR=str(tmp_path / "d")).data_dir == tmp_path / "d"
    assert load(TICKGUARD_DATA_DIR="relative/d").data_dir.is_absolute()


def test_values_are_parsed_and_normalised() -> None:
    settings = load(
        PORT=" 9000 ",
        HOST="0.0.0.0",
        DATABASE_URL="postgres://app:s3cret@db:5432/tickguard?sslmode=require&password=x",
        CORS_ORIGIN="HTTPS://App.Example.com, http://localhost:5173,http://[::1]:3000",
        COINBASE_WS_URL="ws://127.0.0.1:9999/feed",
        COINBASE_PRODUCTS="eth-usd, BTC-USD,eth-usd",
        COINBASE_REST_URL="http://127.0.0.1:9999/",
        PRODUCTS_REFRESH_S="60",
        WS_RECONNECT_BASE_MS="250",
        WS_RECONNECT_MAX_MS="250",
        WS_HEARTBEAT_TIMEOUT_MS="60000",
        MAX_OPEN_POSITIONS_PER_USER="1",
        SHUTDOWN_GRACE_MS="1",
        LOG_LEVEL="DEBUG",
        LOG_FORMAT="Json",
        ALLOW_UNAUTHENTICATED="true",
    )
    assert settings.port == 9000
    assert settings.host == "0.0.0.0"
    assert settings.cors_origins == (
        "https://app.example.com",
        "http://localhost:5173",
        "http://[::1]:3000",
    )
    assert settings.coinbase_products == ("ETH-USD", "BTC-USD")
    # The trailing slash goes: paths are appended to it ("/products").
    assert settings.coinbase_rest_url == "http://127.0.0.1:9999"
    assert settings.products_refresh_s == 60
    assert (settings.ws_reconnect_base_ms, settings.ws_reconnect_max_ms) == (250, 250)
    assert settings.ws_heartbeat_timeout_ms == 60000
    assert settings.max_open_positions_per_user == 1
    assert settings.shutdown_grace_ms == 1
    assert (settings.log_level, settings.log_format) == ("debug", "json")
    assert load(CORS_ORIGIN=" * ").cors_origins == ("*",)


def test_the_database_password_never_shows() -> None:
    settings = load(DATABASE_URL="postgresql://app:s3cret@db:5432/tg?password=x&sslmode=require")
    assert settings.describe_database() == "postgresql://app@db:5432/tg?sslmode=require"
    assert "s3cret" not in repr(settings)
    assert "password" not in repr(settings)
    assert settings.database_url == "postgresql://app:s3cret@db:5432/tg?password=x&sslmode=require"


def test_an_empty_value_means_the_default() -> None:
    assert load(PORT="", DATABASE_URL="  ", COINBASE_PRODUCTS="") == load()


BAD_VALUES = [
    ("PORT", "abc"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "80.5"),
    ("PORT", "1_000"),
    ("HOST", "local host"),
    ("HOST", "http://x"),
    ("HOST", "localhost:80"),
    ("HOST", "127.0.0.1:8080"),
    ("HOST", "[::1]:8080"),
    ("HOST", "localhost/api"),
    ("HOST", "999.1.1.1"),
    ("HOST", "[127.0.0.1]"),
    ("HOST", "[::1"),
    ("HOST", "-leading-hyphen"),
    ("HOST", "a..b"),
    ("HOST", "x" * 64),
    ("DATABASE_URL", "mysql://u:p@db/x"),
    ("DATABASE_URL", "db.example.com:5432"),
    ("TICKGUARD_DATA_DIR", str(Path(__file__))),
    ("CORS_ORIGIN", "localhost:5173"),
    ("CORS_ORIGIN", "http://localhost:5173/"),
    ("CORS_ORIGIN", "http://a.com,,http://b.com"),
    ("CORS_ORIGIN", "ftp://a.com"),
    ("CORS_ORIGIN", "*,http://a.com"),
    ("CORS_ORIGIN", "http://a.com:99999"),
    ("COINBASE_WS_URL", "https://ws-feed.exchange.coinbase.com"),
    ("COINBASE_WS_URL", "wss://"),
    ("COINBASE_PRODUCTS", "BTCUSD"),
    ("COINBASE_PRODUCTS", "BTC-USD,,ETH-USD"),
    ("COINBASE_PRODUCTS", "BTC-USD-X"),
    ("COINBASE_REST_URL", "wss://api.exchange.coinbase.com"),
    ("COINBASE_REST_URL", "https://"),
    ("COINBASE_REST_URL", "https://api.exchange.coinbase.com/?x=1"),
    ("PRODUCTS_REFRESH_S", "0"),
    ("PRODUCTS_REFRESH_S", "1.5"),
    ("PRODUCTS_REFRESH_S", "86401"),
    ("WS_RECONNECT_BASE_MS", "0"),
    ("WS_RECONNECT_BASE_MS", "-5"),
    ("WS_RECONNECT_MAX_MS", "1.5"),
    ("WS_RECONNECT_MAX_MS", "999999999999"),
    ("WS_HEARTBEAT_TIMEOUT_MS", "five"),
    ("MAX_OPEN_POSITIONS_PER_USER", "0"),
    ("MAX_OPEN_POSITIONS_PER_USER", "many"),
    ("SHUTDOWN_GRACE_MS", "-1"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_FORMAT", "xml"),
    ("GAP_FILL", "first"),
    ("RECOVERY_MAX_GAP_S", "0"),
    ("RECOVERY_MAX_GAP_S", "6h"),
    ("RECOVERY_MAX_GAP_S", "31622401"),
    ("EVENT_RETENTION_DAYS", "-1"),
    ("EVENT_RETENTION_DAYS", "1.5"),
    ("EVENT_RETENTION_DAYS", "36501"),
    ("AUTH_JWKS_URL", "idp.example.com/jwks.json"),
    ("AUTH_JWKS_URL", "ftp://idp.example.com/jwks.json"),
    ("AUTH_JWKS_URL", "https:///jwks.json"),
    ("AUTH_JWKS_URL", "http://idp.example.com/jwks.json"),
    ("AUTH_ISSUER", "https://idp\x00.example.com"),
    ("AUTH_AUDIENCE", "api,,web"),
    ("AUTH_AUDIENCE", "api,\tweb\x01"),
    ("AUTH_CLOCK_SKEW_SECONDS", "-1"),
    ("AUTH_CLOCK_SKEW_SECONDS", "601"),
    ("AUTH_JWKS_CACHE_TTL_MS", "0"),
    ("ALLOW_UNAUTHENTICATED", "maybe"),
    ("RATE_LIMIT_PER_USER", "-1"),
    ("RATE_LIMIT_PER_USER", "2.5"),
    ("RATE_LIMIT_PER_ADDRESS", "lots"),
    ("WS_CONNECTS_PER_ADDRESS_PER_MIN", "1000001"),
    ("TICKGUARD_ROLE", "api,broker"),
    ("TICKGUARD_ROLE", ","),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    ("API_WORKERS", "0"),
    ("ENGINE_LEASE_TTL_MS", "10"),
    ("ENGINE_PARTITIONS", "0"),
    ("ENGINE_ID", "engine\x00a"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_each_bad_value_is_refused_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**{name: value})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(name + " ")
    assert name in str(caught.value)


def test_every_variable_has_a_bad_value_case() -> None:
    assert {name for name, _ in BAD_VALUES} == set(KNOWN_VARIABLES)


@pytest.mark.parametrize(
    ("value", "bound"),
    [
        ("localhost", "localhost"),
        ("0.0.0.0", "0.0.0.0"),
        ("10.1.2.3", "10.1.2.3"),
        ("db.internal.example.com", "db.internal.example.com"),
        ("tickguard_web", "tickguard_web"),
        ("::", "::"),
        ("::1", "::1"),
        # Brackets are dropped: the web server adds them itself when it binds an IPv6 address.
        ("[::1]", "::1"),
        ("[fe80::1%eth0]", "fe80::1%eth0"),
    ],
)
def test_host_takes_a_name_or_an_ip_literal(value: str, bound: str) -> None:
    # Non-loopback hosts need ALLOW_UNAUTHENTICATED without auth (tested on its own below).
    assert load(HOST=value, ALLOW_UNAUTHENTICATED="true").host == bound


@pytest.mark.parametrize("value", ["localhost:80", "[::1]:8080"])
def test_a_host_with_a_port_is_told_to_use_port(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^HOST .*\(set the port with PORT\), got '"):
        load(HOST=value)


def test_serve_with_a_host_and_port_in_host_stops_naming_host(tmp_path: Path) -> None:
    # The issue's repro: it used to pass validation and die at bind in a traceback.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HOST": "localhost:80"}
    done = subprocess.run(
        [sys.executable, "-m", "tickguard", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "HOST" in done.stderr and "'localhost:80'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_port_message_quotes_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^PORT must be an integer from 1 to 65535, got 'abc'$"):
        load(PORT="abc")


def test_a_bad_database_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load(DATABASE_URL="mysql://u:hunter2@db/x")
    assert "hunter2" not in str(caught.value)


def test_reconnect_base_above_max_names_both() -> None:
    with pytest.raises(ConfigError) as caught:
        load(WS_RECONNECT_BASE_MS="5000", WS_RECONNECT_MAX_MS="1000")
    assert "WS_RECONNECT_BASE_MS" in str(caught.value)
    assert "WS_RECONNECT_MAX_MS" in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load(PORT="x", LOG_LEVEL="loud", COINBASE_PRODUCTS="nope")
    named = [problem.split()[0] for problem in caught.value.problems]
    assert named == ["PORT", "COINBASE_PRODUCTS", "LOG_LEVEL"]


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nPORT=9001\nLOG_LEVEL=debug\nexport LOG_FORMAT=json\n"
        "COINBASE_PRODUCTS='ETH-USD,SOL-USD'\nDATABASE_URL=postgresql://u@h/${NOT_EXPANDED}\n"
    )
    settings = load_settings({"HOME": "/h", "PORT": "9002"}, env_file=env_file)
    assert settings.port == 9002
    assert settings.log_level == "debug"
    assert settings.log_format == "json"
    assert settings.coinbase_products == ("ETH-USD", "SOL-USD")
    assert settings.database_url == "postgresql://u@h/${NOT_EXPANDED}"


def test_a_bad_value_in_the_env_file_names_its_variable(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LOG_FORMAT=yaml\n")
    with pytest.raises(ConfigError, match="^LOG_FORMAT "):
        load_settings({"HOME": "/h"}, env_file=env_file)


def test_a_missing_env_file_is_not_an_error(tmp_path: Path) -> None:
    assert load_settings({"HOME": "/home/alice"}, env_file=tmp_path / "absent") == load()


def test_env_example_lists_exactly_the_known_variables_with_their_defaults() -> None:
    values = dotenv_values(ENV_EXAMPLE, interpolate=False)
    assert list(values) == list(KNOWN_VARIABLES)
    # The example must load, and loading it must give the defaults.
    assert load_settings({"HOME": "/home/alice"}, env_file=ENV_EXAMPLE) == load()


def test_identity_and_rate_limit_values_are_parsed() -> None:
    settings = load(
        AUTH_JWKS_URL="https://idp.example.com/.well-known/jwks.json",
        AUTH_ISSUER="https://idp.example.com/",
        AUTH_AUDIENCE=" tickguard , web,tickguard",
        AUTH_CLOCK_SKEW_SECONDS="0",
        AUTH_JWKS_CACHE_TTL_MS="60000",
        ALLOW_UNAUTHENTICATED="TRUE",
        RATE_LIMIT_PER_USER="0",
        RATE_LIMIT_PER_ADDRESS="5",
        WS_CONNECTS_PER_ADDRESS_PER_MIN="0",
    )
    assert settings.auth_jwks_url == "https://idp.example.com/.well-known/jwks.json"
    assert settings.auth_issuer == "https://idp.example.com/"
    assert settings.auth_audience == ("tickguard", "web")
    assert (settings.auth_clock_skew_seconds, settings.auth_jwks_cache_ttl_ms) == (0, 60000)
    assert settings.allow_unauthenticated is True
    assert (settings.rate_limit_per_user, settings.rate_limit_per_address) == (0, 5)
    assert settings.ws_connects_per_address_per_min == 0
    assert load(ALLOW_UNAUTHENTICATED="no").allow_unauthenticated is False
    # Plain http is for a JWKS server on this machine only (tests, the dev provider).
    assert load(AUTH_JWKS_URL="http://127.0.0.1:9/jwks").auth_jwks_url == "http://127.0.0.1:9/jwks"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "tickguard.example.com"])
def test_a_non_loopback_host_without_auth_is_refused_in_one_line(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(HOST=host)
    assert len(caught.value.problems) == 1
    line = caught.value.problems[0]
    assert "\n" not in line
    assert line.startswith("HOST ")
    assert "AUTH_JWKS_URL" in line
    assert "ALLOW_UNAUTHENTICATED=true" in line


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_a_loopback_host_needs_no_auth(host: str) -> None:
    assert load(HOST=host).host == host.strip("[]")  # brackets dropped (see HOST's own test)


def test_a_non_loopback_host_is_allowed_with_auth_or_said_out_loud() -> None:
    with_auth = load(HOST="0.0.0.0", AUTH_JWKS_URL="https://idp.example.com/jwks.json")
    assert with_auth.host == "0.0.0.0"
    assert load(HOST="0.0.0.0", ALLOW_UNAUTHENTICATED="true").allow_unauthenticated is True
    # A bad AUTH_JWKS_URL is reported once, as itself, not also as "unset".
    with pytest.raises(ConfigError) as caught:
        load(HOST="0.0.0.0", AUTH_JWKS_URL="idp.example.com")
    assert [p.split()[0] for p in caught.value.problems] == ["AUTH_JWKS_URL"]


def test_event_retention_days_takes_zero_as_keep_forever() -> None:
    assert load(EVENT_RETENTION_DAYS="0").event_retention_days == 0
    assert load(EVENT_RETENTION_DAYS="7").event_retention_days == 7


def test_roles_default_to_all_and_a_split_process_needs_redis_and_a_shared_database() -> None:
    assert load().roles == ("api", "engine", "gateway")
    assert not load().split
    assert load(TICKGUARD_ROLE="all").roles == ("api", "engine", "gateway")
    # Order and case do not matter; the tuple is always in ROLES order.
    both = load(
        TICKGUARD_ROLE="Gateway, api",
        REDIS_URL="redis://127.0.0.1:6379/0",
        DATABASE_URL="postgresql://app@db/app",
    )
    assert both.roles == ("api", "gateway") and both.split and not both.plays("engine")
    with pytest.raises(ConfigError) as caught:
        load(TICKGUARD_ROLE="engine")
    message = str(caught.value)
    assert "REDIS_URL" in message and "DATABASE_URL" in message


def test_workers_need_the_api_role() -> None:
    with pytest.raises(ConfigError, match="API_WORKERS"):
        load(
            API_WORKERS="2",
            TICKGUARD_ROLE="gateway",
            REDIS_URL="redis://127.0.0.1:6379/0",
            DATABASE_URL="postgresql://app@db/app",
        )
    assert load(API_WORKERS="2").api_workers == 2
