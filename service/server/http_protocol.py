"""The gateway's HTTP/1 server protocol: uvicorn's httptools protocol with read deadlines,
and close-delimited streaming for HTTP/1.0 clients.

uvicorn bounds only the idle time between keep-alive requests. A client that connects and
sends nothing, sends its head a byte at a time, or announces a Content-Length longer
than the body it sends holds a connection (and, past its head, a request task) forever.
Here a connection has `header_timeout_s` from connecting (or from its previous response)
to a complete request head, and a request `body_timeout_s` from its head to its last
body byte; past either it gets a 408 (if nothing was answered yet) and is closed.

HTTP/1.0 has no chunked transfer coding (RFC 9112, 7.1 needs HTTP/1.1), but uvicorn
chunks every response without a Content-Length. A 1.0 client gets such a response (a
stream) delimited by the end of the connection instead, which uvicorn already closes
after the response for 1.0.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import Any

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

log = structlog.get_logger(__name__)

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = (
    b'{"error":{"message":"The request was not received in time","type":'
    b'"invalid_request_error","param":null,"code":"request_timeout"}}'
)


class _CloseDelimitedCycle(RequestResponseCycle):
    """A request/response cycle whose response, if it has no Content-Length, is sent
    as raw bytes ended by closing the connection (for HTTP/1.0 clients)."""

    _close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            if not names & {b"content-length", b"transfer-encoding"}:
                self._close_delimited = True
                self.chunked_encoding = False
                self.expected_content_length = sys.maxsize
        elif (
            self._close_delimited
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
        ):
            # uvicorn checks that a framed body ended where its length said: this one
            # ends here, at the last part.
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class TimedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a deadline for the request head and one for its body."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answered = cycle is not None and cycle.response_started and not cycle.response_complete
        log.info("http.read_timeout", waiting_for=what, client=self.client)
        if not answered:
            self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        # The request's task, if one runs, sees the client gone (http.disconnect).
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self._body_timeout_s, "body")
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            # The cycle's task is scheduled, not started: it runs with this class's send.
            self.cycle.__class__ = _CloseDelimitedCycle

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self._header_timeout_s, "head")


def protocol_factory(header_timeout_s: float, body_timeout_s: float) -> Callable[..., Any]:
    """What `uvicorn.Config(http=...)` takes to serve with this protocol."""
    return functools.partial(
        TimedHttpProtocol, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s
    )
