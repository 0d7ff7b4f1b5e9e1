"""Timestamps of every HTTP hop between the load client, the gateway and the engine, for
`benchmarks/hop_trace.py`.

`install(directory)` patches, in the process that calls it, whatever of these it finds:
asyncio's selector socket transport (the load client's reads and writes), uvicorn's
httptools protocol (the gateway's and the engine's server side: data received, ASGI
sends), the gateway's engine connection (`service.engine.http_pool`) and its outermost
middleware (when a request's last Python step ends). Each event is one line, written
with one unbuffered `os.write` to `<directory>/<pid>.log`:

    CW fd t bytes                      client socket write
    CR fd t t_end                      client socket read
    SR id t t_end bytes                server: data received from its client
    SS id t t_end type bytes more      server: ASGI send (response start or body)
    EW id t bytes                      gateway: request written to the engine
    ER id t t_end bytes                gateway: data received from the engine
    GX - t                             gateway: a request's middleware returned
    MARK - t label                     the benchmark: a phase begins (`mark`)

Times are `time.perf_counter_ns()`, the system-wide monotonic clock, so the processes'
lines interleave. The cost is a few microseconds per event, in every process alike.
A diagnostic, not part of the product: it patches private methods of the versions in
use (uvicorn 0.54, Python 3.11's asyncio) and says so in the log when one is missing.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

ENV = "HOP_TRACE_DIR"


def install_from_env() -> None:
    directory = os.environ.get(ENV)
    if directory:
        install(directory)


def install(directory: str) -> Callable[[str], None]:
    """Patch this process; returns `mark(label)`, which logs the start of a phase."""
    fd = os.open(
        os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND
    )
    now = time.perf_counter_ns

    def emit(line: str) -> None:
        os.write(fd, line.encode() + b"\n")

    for patch in (_client_transport, _uvicorn_server, _engine_connection, _gateway_exit):
        try:
            patch(emit, now)
        except (ImportError, AttributeError) as exc:
            emit(f"ERR {patch.__name__} {exc!r}")
    return lambda label: emit(f"MARK - {now()} {label}")


def _client_transport(emit: Callable[[str], None], now: Callable[[], int]) -> None:
    import asyncio.selector_events as selector_events

    transport = selector_events._SelectorSocketTransport
    read_ready, write = transport._read_ready, transport.write

    def traced_read_ready(self: Any) -> None:
        start = now()
        read_ready(self)
        emit(f"CR {self._sock_fd} {start} {now()}")

    def traced_write(self: Any, data: Any) -> None:
        emit(f"CW {self._sock_fd} {now()} {len(data)}")
        write(self, data)

    transport._read_ready = traced_read_ready  # type: ignore[method-assign]
    transport.write = traced_write  # type: ignore[method-assign]


def _uvicorn_server(emit: Callable[[str], None], now: Callable[[], int]) -> None:
    from uvicorn.protocols.http import httptools_impl

    protocol = httptools_impl.HttpToolsProtocol
    cycle = httptools_impl.RequestResponseCycle
    data_received, send = protocol.data_received, cycle.send

    def traced_data_received(self: Any, data: bytes) -> None:
        start = now()
        data_received(self, data)
        emit(f"SR {id(self)} {start} {now()} {len(data)}")

    async def traced_send(self: Any, message: Any) -> None:
        start = now()
        await send(self, message)
        body = len(message.get("body", b""))
        more = message.get("more_body", False)
        emit(f"SS {id(self)} {start} {now()} {message['type']} {body} {more}")

    protocol.data_received = traced_data_received  # type: ignore[method-assign]
    cycle.send = traced_send  # type: ignore[method-assign]


def _engine_connection(emit: Callable[[str], None], now: Callable[[], int]) -> None:
    from service.engine import http_pool as engine_http

    connection = engine_http._Connection
    data_received, write = connection.data_received, connection.write

    def traced_data_received(self: Any, data: bytes) -> None:
        start = now()
        data_received(self, data)
        emit(f"ER {id(self)} {start} {now()} {len(data)}")

    def traced_write(self: Any, data: bytes) -> None:
        emit(f"EW {id(self)} {now()} {len(data)}")
        write(self, data)

    connection.data_received = traced_data_received  # type: ignore[method-assign]
    connection.write = traced_write  # type: ignore[method-assign]


def _gateway_exit(emit: Callable[[str], None], now: Callable[[], int]) -> None:
    from service.server import http_metrics

    middleware = http_metrics.HttpMetricsMiddleware
    call = middleware.__call__

    @functools.wraps(call)
    async def traced_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        try:
            await call(self, scope, receive, send)
        finally:
            emit(f"GX - {now()}")

    middleware.__call__ = traced_call  # type: ignore[method-assign]
