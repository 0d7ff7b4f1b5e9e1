"""ASGI middleware accounting for every HTTP response: counted by route template and
status code, and one access-log line each (uvicorn's own access log is off: it goes
through the standard library's logging, several times the cost of a structlog line).

Pure ASGI rather than BaseHTTPMiddleware: it must not buffer or re-wrap the SSE stream.
"""

from __future__ import annotations

import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.server.metrics import GatewayMetrics

log = structlog.get_logger("service.access")


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500
        request_id: str | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers") or ():
                    if name.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_requests.labels(
                scope["method"], _route_template(scope), str(status)
            ).inc()
            client = scope.get("client")
            log.info(
                "http.request",
                method=scope["method"],
                path=scope["path"],
                query=scope.get("query_string", b"").decode("latin-1") or None,
                http_version=scope.get("http_version"),
                status=status,
                ms=round((time.monotonic() - started) * 1000, 2),
                client=f"{client[0]}:{client[1]}" if client else None,
                request_id=request_id,
            )


def _route_template(scope: Scope) -> str:
    # Label by template, never by raw path: unknown paths must not create new series. The
    # router records the matched route in the (shared) scope.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
