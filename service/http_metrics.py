"""ASGI middleware counting every HTTP response by route template and status code.

Pure ASGI rather than BaseHTTPMiddleware: it must not buffer or re-wrap the SSE stream.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import GatewayMetrics


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_requests.labels(
                scope["method"], _route_template(scope), str(status)
            ).inc()


def _route_template(scope: Scope) -> str:
    # Label by template, never by raw path: unknown paths must not create new series. The
    # router records the matched route in the (shared) scope.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
