"""Configuration: defaults, validation messages that name the variable, .env precedence."""

from __future__ import annotations

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
    )
    assert settings.describe_database() == (
        "embedded PostgreSQL in /home/alice/.local/share/tickguard"
    )


def test_settings_fields_are_exactly_the_known_variables() -> None:
    renamed = {"CORS_ORIGIN": "cors_origins", "TICKGUARD_DATA_DIR": "data_dir"}
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
