"""A test-owned TCP proxy that can cut traffic: a partition between a process and a server.

``running_proxy(host, port)`` listens on a free loopback port and forwards each connection to
``host:port``. ``cut()`` closes every connection through it and closes new ones as soon as
they arrive (the client sees its server go away); ``heal()`` forwards again. ``hold()`` keeps
every connection open but forwards nothing (a server that stops answering, a half-open
socket) until ``release()``. The server behind it is never touched, so a shared server can
stand behind a partition.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_now = False
        self.connections = 0  # accepted while healthy
        self._scopes: set[trio.CancelScope] = set()
        self._flowing = trio.Event()
        self._flowing.set()

    def cut(self) -> None:
        self.cut_now = True
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self.cut_now = False

    def hold(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # either side closing ends both

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self.cut_now:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    server = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                async with server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            self._scopes.discard(scope)


@asynccontextmanager
async def running_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_host, target_port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()
