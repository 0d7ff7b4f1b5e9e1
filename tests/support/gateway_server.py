"""Run an ASGI app (the gateway, or a fake engine) on a real socket in a background thread.

Real HTTP matters here: disconnects, SSE framing and timeouts only behave like
production over a socket, not through an in-process transport.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvicorn

from tests.support.sglang_server import free_port


@contextlib.contextmanager
def serve_app(
    app: Any,
    *,
    startup_timeout_s: float = 30.0,
    make_server: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server,
    http: Any = "auto",
) -> Iterator[str]:
    """`http`: uvicorn's protocol, e.g. `service.server.http_protocol.protocol_factory(...)`."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=http,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = make_server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    """Block until the gateway's readiness probe says ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready after {timeout_s:.0f}s")
