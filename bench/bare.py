"""The framework's own rate, B: a bare quart-trio app answering a fixed small JSON body,
served by hypercorn with ``tickguard serve``'s settings (``web.app.hypercorn_config``: one
worker, same bind, hypercorn's access log off as in ours; ours writes its access line at DEBUG,
which the REST benchmark's ``LOG_LEVEL=info`` leaves out, so neither logs per request).

``python -m bench.bare --port N`` runs it until SIGTERM/SIGINT; ``bare_subprocess()`` starts it
as its own process for the REST benchmark, which measures it with the same ``wrk`` settings as
tickguard's routes and states every REST figure as a fraction of B (issue 16).

None of tickguard's own layers (request ids, CORS, identity, content type, error handlers,
``EarlyAnswerClose``, connection isolation) is installed: what remains is the framework.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from hypercorn.trio import serve
from quart import Response
from quart_trio import QuartTrio

from bench.common import SERVE_READY_S, Server, free_port, python_path
from tickguard.web.app import hypercorn_config

PATH = "/bare"
# About the size of tickguard's /health body.
BODY = b'{"ok":true,"service":"bare","timestamp":"2026-12-02T00:00:00.000Z"}'

log = logging.getLogger("bench.bare")


def create_bare_app() -> QuartTrio:
    app = QuartTrio("bare")

    @app.get(PATH)
    async def bare() -> Response:
        return Response(BODY, status=200, content_type="application/json")

    return app


async def _serve(port: int) -> None:
    config = hypercorn_config("127.0.0.1", port)
    stop = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        bound = await nursery.start(
            lambda task_status: serve(
                create_bare_app(),  # type: ignore[arg-type]
                config,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        log.info("listening on %s", " ".join(bound))
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    trio.run(_serve, args.port)
    return 0


@asynccontextmanager
async def bare_subprocess() -> AsyncIterator[Server]:
    """``python -m bench.bare`` on a free port, as its own process; yields once it answers."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.bare", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": python_path()},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(process, f"http://127.0.0.1:{port}", time.perf_counter())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._read_log)
            await server.wait_for_line("listening on", timeout=SERVE_READY_S)
            try:
                yield server
            finally:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    sys.exit(main())
