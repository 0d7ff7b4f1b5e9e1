"""Direct dispatch of the chat route: `POST /v1/chat/completions` goes from the metrics
middleware straight to its handler.

Why: one request at a time, the gateway's code runs cold (its caches are cold after the
idle time between requests), and what it costs then grows with how much code a request
walks through. The layers skipped here do nothing for this route: the exception
middleware (the handler's OpenAI errors become responses here, as its handler would
make them), FastAPI's exit-stack middleware and per-request wrappers (the route has no
dependencies), and the router's match against every route.

What is not skipped: the middleware outside this one (server errors, body limit,
metrics and the access line) and everything the handler does. Anything else, including
other methods on the same path (405), the path with a trailing slash and paths under a
root path, goes through the framework as before. The route stays declared on the app,
for the OpenAPI document and the metrics' route label.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import OpenAIError

Handler = Callable[[Request], Awaitable[Response]]


class ChatDispatch:
    def __init__(self, app: ASGIApp, *, path: str, route: BaseRoute, handler: Handler) -> None:
        self.app = app
        self.path = path
        self.route = route
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # An exact match: behind a root path (none is configured) the router takes it.
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        # What the router would have recorded: the metrics label the request by route.
        scope["route"] = self.route
        scope["endpoint"] = self.handler
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except OpenAIError as exc:
            response = exc.response()
        # Anything else propagates to the server-error middleware, as through the router.
        await response(scope, receive, send)
