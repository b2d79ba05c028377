"""The ``tickguard`` command: serve (the default), migrate, db dump/restore, sim, --version."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from tickguard import __version__, logs
from tickguard.config import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickguard",
        description="Trading backend: stores positions, watches Coinbase's ticker and closes "
        "take-profits and stop-losses server-side. Configuration comes from the environment "
        "and a .env file (see README).",
    )
    parser.add_argument("--version", action="version", version=f"tickguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the service (the default)",
        description="Run tickguard. Without --role it is one process playing every role.",
    )
    serve.add_argument(
        "--role",
        metavar="ROLES",
        help="all (default), or api, engine, gateway, or a comma list such as api,gateway: the "
        "others run in other processes sharing DATABASE_URL and REDIS_URL (TICKGUARD_ROLE)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="api processes sharing PORT (API_WORKERS, default 1)",
    )
    # A worker of `serve --workers N` (tickguard.workers starts them): serve, sharing PORT.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply database migrations and exit")
    db = commands.add_parser("db", help="dump or restore the database")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    dump = db_commands.add_parser("dump", help="write the database to FILE (pg_dump custom format)")
    dump.add_argument("file", type=Path)
    restore = db_commands.add_parser("restore", help="load a dump written by `db dump`")
    restore.add_argument("file", type=Path)
    dev_token = commands.add_parser(
        "dev-token",
        help="print a development bearer token for USER (or the dev JWKS); never for production",
        description="A development identity provider: an RSA key kept in TICKGUARD_DATA_DIR/"
        "dev-jwks/ (made on first use) signs RS256 tokens; point AUTH_JWKS_URL at its JWKS "
        "(--serve) to run tickguard with authentication and no real identity provider.",
    )
    dev_token.add_argument("user", nargs="?", help="the token's sub (the user id)")
    dev_token.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)"
    )
    dev_what = dev_token.add_mutually_exclusive_group()
    dev_what.add_argument("--jwks", action="store_true", help="print the JWKS document instead")
    dev_what.add_argument(
        "--serve",
        action="store_true",
        help="serve the JWKS at http://127.0.0.1:PORT/jwks.json until interrupted",
    )
    dev_token.add_argument("--port", type=int, default=8766, help="port for --serve (8766)")
    commands.add_parser(
        "sim",
        help="run the Coinbase-protocol simulator (see `tickguard sim --help`)",
        add_help=False,
    )
    return parser


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``LOG_LEVEL`` in ``LOG_FORMAT`` (see ``tickguard.logs``)."""
    logs.configure(settings.log_level, "json" if settings.log_format == "json" else "text")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["sim"]:
        from tickguard.sim import main as sim_main

        return sim_main(args_list[1:])
    args = _parser().parse_args(args_list)
    # Command-line options win over the environment and are validated the same way.
    environ = dict(os.environ)
    for option, variable in (("role", "TICKGUARD_ROLE"), ("workers", "API_WORKERS")):
        value = getattr(args, option, None)
        if value is not None:
            environ[variable] = value
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        print(f"tickguard: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    command = args.command or "serve"
    if command == "serve":
        if settings.api_workers > 1 and not getattr(args, "reuse_port", False):
            from tickguard.supervisor import check_port
            from tickguard.workers import serve_workers

            parent = functools.partial(
                serve_workers,
                environ=environ,
                check_port=functools.partial(check_port, shared=False),
            )
            return _run(parent, settings)
        from tickguard.supervisor import serve

        return _run(serve, settings)
    if command == "migrate":
        return _run(_migrate, settings)
    if command == "db":
        return _db(settings, args.db_command, args.file)
    if command == "dev-token":
        return _dev_token(settings, args)
    raise AssertionError(command)


def _run(main: Callable[[Settings], Awaitable[int]], settings: Settings) -> int:
    """``trio.run(main, settings)``; a failure a user can act on (the database cannot be
    reached or its directory is in use, a port is taken) is one line, not a traceback, and
    exit status 1. ``serve`` handles SIGINT/SIGTERM itself (exit 0); a Ctrl-C elsewhere (e.g.
    ``migrate`` waiting for the database) is one line too, and status 130 as shells expect."""
    from tickguard.actors.supervision import ChildStartFailed, innermost
    from tickguard.storage import DatabaseUnavailable
    from tickguard.storage.embedded import EmbeddedDatabaseError
    from tickguard.supervisor import PortInUse

    problems: list[str] = []
    interrupted = False
    try:
        return int(trio.run(main, settings))
    except* KeyboardInterrupt:
        interrupted = True
    except* PortInUse as group:
        problems.append(str(innermost(group)))
    except* (DatabaseUnavailable, EmbeddedDatabaseError) as group:
        problems.append(f"database: {innermost(group)}")
    except* ChildStartFailed as group:
        failed = innermost(group)
        cause = innermost(failed.__cause__) if failed.__cause__ is not None else None
        problems.append(f"{failed}: {cause}" if cause is not None else str(failed))
    for problem in problems:
        print(f"tickguard: {problem}", file=sys.stderr)
    if interrupted and not problems:
        print("tickguard: interrupted", file=sys.stderr)
        return 130
    return 1


async def _migrate(settings: Settings) -> int:
    from tickguard.supervisor import open_storage

    async with open_storage(settings):
        logging.getLogger("tickguard").info("database is up to date")
    return 0


def _db(settings: Settings, action: str, file: Path) -> int:
    """pg_dump / pg_restore of the configured database, with the bundled client binaries."""
    from tickguard.storage.embedded import EmbeddedPostgres, bin_dir

    server = None
    dsn = settings.database_url
    if dsn is None:
        server = EmbeddedPostgres(settings.data_dir)
        dsn = server.start()
    try:
        if action == "dump":
            cmd = [
                str(bin_dir() / "pg_dump"),
                "--format=custom",
                "--no-owner",
                f"--file={file}",
                f"--dbname={dsn}",
            ]
        else:
            cmd = [
                str(bin_dir() / "pg_restore"),
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                f"--dbname={dsn}",
                str(file),
            ]
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            print(f"tickguard: {cmd[0]} failed with exit code {done.returncode}", file=sys.stderr)
            return 1
        print(f"{'wrote' if action == 'dump' else 'restored'} {file}")
        return 0
    finally:
        if server is not None:
            server.stop()


def _dev_token(settings: Settings, args: argparse.Namespace) -> int:
    """``tickguard dev-token``: a token for USER (iss/aud as AUTH_ISSUER/AUTH_AUDIENCE say, so
    the server accepts it), the JWKS (``--jwks``), or the JWKS served (``--serve``)."""
    import json

    from tickguard.web import dev_identity
    from tickguard.web.schemas import FieldError, parse_user_id

    key = dev_identity.load_or_create(settings.data_dir)
    if args.jwks:
        print(json.dumps(key.jwks(), indent=2))
        return 0
    if args.serve:

        async def serve_until_interrupted() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    url = await nursery.start(dev_identity.serve_jwks, key, "127.0.0.1", args.port)
                    print(f"dev JWKS at {url} (AUTH_JWKS_URL={url}); Ctrl-C stops", flush=True)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

        failures: list[str] = []
        try:
            trio.run(serve_until_interrupted)
        except* OSError as group:  # the port is taken, most likely
            failures.append(f"tickguard: dev JWKS server: {group.exceptions[0]}")
        for failure in failures:
            print(failure, file=sys.stderr)
        return 1 if failures else 0
    if args.user is None:
        print("tickguard: dev-token needs USER (or --jwks, --serve)", file=sys.stderr)
        return 2
    try:
        user = parse_user_id("USER", args.user)
    except FieldError as exc:
        print(f"tickguard: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.ttl <= 366 * 86400:
        print("tickguard: --ttl must be 1 to 31622400 seconds", file=sys.stderr)
        return 2
    audience = settings.auth_audience[0] if settings.auth_audience else None
    issuer = settings.auth_issuer or dev_identity.DEV_ISSUER
    print(key.token(user, ttl_s=args.ttl, issuer=issuer, audience=audience))
    return 0


if __name__ == "__main__":
    sys.exit(main())
