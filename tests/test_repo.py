"""The front door tells the truth: README, Makefile, constraints and deploy files match the code.

README's configuration table, route table and commands are compared with what the code reads,
serves and accepts; the Makefile's `test` target is run on tiny suites to show that pytest's
exit code (5 for "no tests collected" included) reaches CI; the deploy files are held to the
defaults they depend on (port, shutdown grace).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tickguard import __version__
from tickguard.config import KNOWN_VARIABLES, Settings, load_settings
from tickguard.web.openapi import ROUTES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def _section(title: str) -> str:
    """The README text under the level-2 heading ``title``, up to the next one."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every body row of the markdown tables in ``text`` (header and rule
    skipped), with ``\\|`` unescaped."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells)
    return rows[1:] if rows else rows


def _defaults() -> Settings:
    return load_settings({"HOME": "/home/alice"}, env_file=None)


def _readme_configuration() -> dict[str, str]:
    rows = _table_rows(_section("Configuration"))
    table = {}
    for name, default, _meaning in rows:
        table[name.strip("`")] = default.replace("`", "")
    return table


def test_readme_configuration_table_lists_exactly_the_known_variables() -> None:
    assert list(_readme_configuration()) == list(KNOWN_VARIABLES)


def test_readme_configuration_defaults_are_the_code_defaults() -> None:
    s = _defaults()
    expected = {
        "PORT": str(s.port),
        "HOST": s.host,
        "DATABASE_URL": "unset",
        # README writes the home directory as ~.
        "TICKGUARD_DATA_DIR": str(s.data_dir).replace("/home/alice", "~"),
        "CORS_ORIGIN": ",".join(s.cors_origins),
        "COINBASE_WS_URL": s.coinbase_ws_url,
        "COINBASE_PRODUCTS": ",".join(s.coinbase_products),
        "COINBASE_REST_URL": s.coinbase_rest_url,
        "PRODUCTS_REFRESH_S": str(s.products_refresh_s),
        "WS_RECONNECT_BASE_MS": str(s.ws_reconnect_base_ms),
        "WS_RECONNECT_MAX_MS": str(s.ws_reconnect_max_ms),
        "WS_HEARTBEAT_TIMEOUT_MS": str(s.ws_heartbeat_timeout_ms),
        "MAX_OPEN_POSITIONS_PER_USER": str(s.max_open_positions_per_user),
        "SHUTDOWN_GRACE_MS": str(s.shutdown_grace_ms),
        "LOG_LEVEL": s.log_level,
        "LOG_FORMAT": s.log_format,
    }
    assert s.database_url is None
    documented = _readme_configuration()
    wrong = {
        name: (documented.get(name), value)
        for name, value in expected.items()
        if not documented.get(name, "").split(" ")[0] == value
    }
    assert not wrong, f"README default differs from the code (README, code): {wrong}"


def test_readme_routes_are_exactly_the_served_routes() -> None:
    documented = set()
    for cells in _table_rows(_section("The API in brief")):
        match = re.fullmatch(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?]*)[^`]*`.*", cells[0])
        assert match, f"README route cell not understood: {cells[0]!r}"
        documented.add((match.group(1), match.group(2)))
    served = {(route.method.upper(), route.path) for route in ROUTES}
    assert documented == served


def _tickguard(*args: str) -> subprocess.CompletedProcess[str]:
    # `python -m tickguard` is the console script's entry point without relying on PATH.
    return subprocess.run(
        [sys.executable, "-m", "tickguard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_readme_commands_are_the_cli_commands() -> None:
    # Every `tickguard ...` snippet of the table's first column, as its words after "tickguard".
    commands = {
        tuple(snippet.split()[1:])
        for cells in _table_rows(_section("Command line"))
        for snippet in re.findall(r"`(tickguard[^`]*)`", cells[0])
    }
    subcommands = {words[0] for words in commands if words and not words[0].startswith("-")}
    assert subcommands == {"serve", "migrate", "db", "sim", "dev-token"}
    usage = _tickguard("--help")
    assert usage.returncode == 0, usage.stderr
    for name in subcommands:
        assert re.search(rf"^\s+{name}\s", usage.stdout, re.M), f"{name} not in --help"
    db_usage = _tickguard("db", "--help")
    assert db_usage.returncode == 0, db_usage.stderr
    for words in commands:
        if words[:1] == ("db",):
            assert words[1] in db_usage.stdout
    version = _tickguard("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"tickguard {__version__}"


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    # The running interpreter's venv stands in for .venv, and the install step is skipped (-o):
    # these runs check the Makefile's own logic, not the install.
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.run(
        [
            MAKE,
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            f"BIN={Path(sys.executable).parent}",
        ]
        + list(args),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env=env,
        check=False,
    )


@needs_make
def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"(?<![\w./-])make ([a-z][a-z-]*)", README))
    assert {"run", "test", "check"} <= targets
    for target in sorted(targets):
        dry = _make("-n", target)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"


@needs_make
@pytest.mark.parametrize(
    ("body", "fails"),
    [
        ("def test_passes():\n    assert True\n", False),
        ("def test_fails():\n    assert False\n", True),
        # pytest exits 5 when it collects nothing: `make test` must fail then, not pass.
        ("def helper():\n    pass\n", True),
    ],
    ids=["passing", "failing", "no-tests"],
)
def test_make_test_passes_only_when_pytest_ran_and_passed(
    tmp_path: Path, body: str, fails: bool
) -> None:
    suite = tmp_path / "test_tiny.py"
    suite.write_text(body)
    args = f"-p no:cacheprovider --rootdir={tmp_path} -c /dev/null {suite}"
    result = _make("test", f"PYTEST_ARGS={args}")
    assert (result.returncode != 0) == fails, result.stdout + result.stderr
    if body.startswith("def helper"):
        assert "collected no tests" in result.stderr


def test_ci_script_is_executable_bash() -> None:
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_ci_script_pipes_into_nothing_that_stops_reading_early() -> None:
    """Under pipefail, `cmd | head -n 1` fails whenever head exits before cmd has written all
    it has: cmd dies of SIGPIPE (141) and `set -e` ends CI at that line. It happened once, on
    `make --version | head -n 1` (7 in 500 tries on this machine)."""
    early = re.compile(r"\|\s*(head\b|grep\s+(-\w*[qm]\w*\b|--quiet|--max-count))")
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    offending = [ln for ln in lines if not ln.lstrip().startswith("#") and early.search(ln)]
    assert offending == []
    assert early.search("make --version | head -n 1")
    assert early.search("ps | grep -q x") and not early.search("make --version | sed -n 1p")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt line is not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_at_the_installed_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    pins = _pins()
    assert "tickguard" not in pins
    unpinned = [str(r.name) for r in declared if canonicalize_name(r.name) not in pins]
    assert not unpinned, f"not pinned in constraints.txt: {unpinned}"
    outside = [
        f"{r.name}=={pins[canonicalize_name(r.name)]} vs {r.specifier}"
        for r in declared
        if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    ]
    assert not outside, f"constraints.txt pins outside pyproject's ranges: {outside}"
    drift = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"installed versions differ from constraints.txt (pinned, installed): {drift}"


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9]+)(s|min)?", text)
    assert match, f"not a duration: {text!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_deploy_files_agree_with_the_defaults() -> None:
    defaults = _defaults()
    grace = defaults.shutdown_grace_ms / 1000
    unit = (ROOT / "deploy" / "tickguard.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\S+)$", unit, re.M)
    assert stop and _seconds(stop.group(1)) > grace
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)
    assert re.search(r"^Restart=on-failure$", unit, re.M)

    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    stop_grace = re.search(r"^\s+stop_grace_period: (\S+)$", compose, re.M)
    assert stop_grace and _seconds(stop_grace.group(1)) > grace
    assert re.search(r"condition: service_healthy", compose)

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {defaults.port}$", dockerfile, re.M)
    assert re.search(r"^\s+HOST=0\.0\.0\.0", dockerfile, re.M)
    assert "/health" in dockerfile and ("get", "/health") in {(r.method, r.path) for r in ROUTES}
    assert re.search(r'^ENTRYPOINT \["tini", "--", "tickguard"\]$', dockerfile, re.M)


needs_git_checkout = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs git and a git checkout of tickguard",
)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `git clone` of this checkout's HEAD in a folder named `tickguard` (the most natural
    name, and the package's own): what a new user starts from."""
    clone = tmp_path_factory.mktemp("clone") / "tickguard"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return clone


@needs_make
@needs_git_checkout
def test_lint_passes_in_a_fresh_clone_named_tickguard(fresh_clone: Path) -> None:
    # ruff's import sorting once took `tickguard` for first-party in such a folder only
    # (issue 12 §1), and lint-imports must check the clone's code, not the checkout the venv
    # was installed from.
    lint = _make("-C", str(fresh_clone), "lint")
    output = lint.stdout + lint.stderr
    assert lint.returncode == 0, output
    # Each of the three checks ran and passed in the clone.
    assert "All checks passed!" in output
    assert re.search(r"^\d+ files already formatted$", output, re.M), output
    assert re.search(r"^Contracts: \d+ kept, 0 broken\.$", output, re.M), output
    assert (fresh_clone / "build" / "lint" / "tickguard").resolve() == fresh_clone.resolve()


@needs_git_checkout
def test_the_wheel_builds_without_warnings_and_ships_the_migrations(
    fresh_clone: Path, tmp_path: Path
) -> None:
    # Offline (no build isolation): the venv's setuptools is the pinned one of the test extras.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--wheel-dir", str(tmp_path), str(fresh_clone)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    # setuptools' deprecations (license table) and package-discovery complaints (a data
    # folder left out of `packages`) are BuildBackendWarnings; a clean build has none.
    assert "Warning" not in built.stderr, built.stderr
    [wheel] = tmp_path.glob("tickguard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert b"\nLicense-Expression: MIT\n" in metadata
    shipped = sorted(Path(n).name for n in names if n.startswith("tickguard/storage/migrations/"))
    sources = sorted(p.name for p in (fresh_clone / "storage" / "migrations").glob("*.sql"))
    assert shipped == sources and sources
    # The single binary's spec collects the same folder itself (it reads no package data).
    spec = (fresh_clone / "deploy" / "tickguard.spec").read_text()
    assert 'ROOT / "storage" / "migrations"' in spec
    assert '"tickguard/storage/migrations"' in spec


def test_the_scaled_compose_profile_runs_each_role_on_shared_postgres_and_redis() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    scaled = {name for name, s in services.items() if "scaled" in s.get("profiles", [])}
    assert scaled == {"redis", "api", "engine", "gateway", "proxy"}
    roles = {name: services[name]["command"] for name in ("api", "engine", "gateway")}
    assert roles == {name: ["serve", "--role", name] for name in roles}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["engine"]["deploy"]["replicas"] == 2
    for name in roles:
        environment = services[name]["environment"]
        assert environment["REDIS_URL"].startswith("redis://redis:")
        assert "@postgres:5432/" in environment["DATABASE_URL"]
        assert services[name]["stop_grace_period"] == services["tickguard"]["stop_grace_period"]
    # One origin for the React app: /ws to the gateway, the rest to the api processes.
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    ws = re.search(r"location = /ws \{(.*?)\n    \}", nginx, re.S)
    assert ws and "http://gateway:8080" in ws.group(1) and "Upgrade" in ws.group(1)
    rest = re.search(r"location / \{(.*?)\n    \}", nginx, re.S)
    assert rest and "http://api:8080" in rest.group(1)
