"""A stand-in worker for tests/test_workers.py: ``python reuse_port_server.py HOST PORT``.

Binds HOST:PORT with ``tickguard.workers.bind_shared`` (as a real worker does), answers every
HTTP request with its pid (one request per connection) and exits 0 on SIGTERM, so the tests
can tell the workers behind the one port apart without a database.
"""

from __future__ import annotations

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import FrameType

from tickguard.workers import bind_shared


class _AnswerPid(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # fifty requests per test: no line each


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, _stop)
    server = HTTPServer((host, port), _AnswerPid, bind_and_activate=False)
    server.socket.close()
    server.socket = bind_shared(host, port)
    server.server_activate()  # listen
    with server:
        server.serve_forever()


if __name__ == "__main__":
    main()
