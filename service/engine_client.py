"""HTTP client for SGLang's own endpoints. The gateway never imports SGLang.

aiohttp rather than httpx: the upstream hop is on every request's path, and aiohttp's C
HTTP parser costs a fraction of httpx + httpcore + h11 in pure Python (see
docs/benchmarks.md, "Gateway overhead").

Transport failures become typed exceptions here, so the chat service and the stream
relay map them to OpenAI errors (503, 504) in one place and never see aiohttp.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger(__name__)

CHAT_PATH = "/v1/chat/completions"
ABORT_TIMEOUT_S = 5.0
# SSE lines are read from raw chunks, so no line-length limit applies; this only sizes
# the reads.
READ_BUFSIZE = 1 << 16
# After `[DONE]` the engine ends the body at once; a keep-alive connection is worth a
# short wait for that, not more.
DRAIN_TIMEOUT_S = 0.2
# aiohttp's read timeout starts once the body is written; this bounds the writing, for
# an engine that accepts a connection and then stops reading.
WRITE_TIMEOUT_S = 30.0
# Idle pooled connections are dropped before the engine's server would close them
# (uvicorn: 5 s), so that a request never goes out on a connection being closed.
KEEPALIVE_S = 4.0


class Health(StrEnum):
    OK = "ok"
    SLOW = "slow"  # accepted the connection, no answer within the probe's timeout
    DOWN = "down"  # refused, reset, or answered with an error status


class EngineUnavailable(Exception):
    """The engine could not be reached or dropped the connection."""


class EngineTimeout(Exception):
    """The engine accepted the request but stayed silent past the upstream timeout."""


class EngineHTTPError(Exception):
    def __init__(self, status_code: int, payload: Any) -> None:
        super().__init__(f"engine returned HTTP {status_code}")
        self.status_code = status_code
        self.payload = payload


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _translate(exc: BaseException) -> Exception:
    """aiohttp's failure -> ours. A connect (or pool) timeout means the engine is not
    taking work; a read timeout means it took the request and went silent."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return EngineUnavailable(_describe(exc))
    if isinstance(exc, TimeoutError):
        return EngineTimeout(_describe(exc))
    return EngineUnavailable(_describe(exc))


# What a failed exchange with the engine can raise (OSError: a reset socket may surface
# unwrapped from a read).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class EngineStream:
    """An open streaming response. Iterate `line_batches()`; always `aclose()`."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def line_batches(self) -> AsyncIterator[list[bytes]]:
        """The body's complete lines, without their line ends, in one list per network
        read: the relay turns each into one write to its client, so an engine sending a
        burst of events costs one send, not one per event. Bytes, not text: the relay
        passes most lines on untouched.

        Raises EngineTimeout or EngineUnavailable when the engine stalls or drops the
        connection mid-stream.
        """
        pending = b""
        try:
            async for data in self._response.content.iter_any():
                pending += data
                if b"\n" not in data:
                    continue
                *complete, pending = pending.split(b"\n")
                yield [raw.rstrip(b"\r") for raw in complete]
        except TRANSPORT_ERRORS as exc:
            raise _translate(exc) from exc
        if pending:
            yield [pending.rstrip(b"\r")]

    async def aclose(self, *, drain: bool = False) -> None:
        """Hand the connection back to the pool if the body was read to its end, else
        close it. `drain`: the stream is logically complete (`[DONE]` seen), so wait
        briefly for the body's terminating chunk, which keeps the connection reusable."""
        content = self._response.content
        if drain and not content.at_eof():
            try:
                await asyncio.wait_for(content.read(), DRAIN_TIMEOUT_S)
            except (*TRANSPORT_ERRORS, ValueError):
                pass
        self._response.release()

    def close(self) -> None:
        """Drop the connection now (a stream nobody will read: no drain, no reuse)."""
        self._response.close()


class EngineClient:
    """One pooled aiohttp session per gateway. Create it inside the running event loop
    (the app's lifespan)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        metrics_timeout_s: float = 2.0,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.read_timeout_s = read_timeout_s
        # Until the response headers: writing the body, then the engine's silence.
        self._until_headers_s = write_timeout_s + read_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s,  # includes waiting for a pooled connection
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._metrics_timeout = aiohttp.ClientTimeout(total=metrics_timeout_s)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
            ),
            timeout=timeout,
            # Loopback traffic must never be routed through a proxy from the environment.
            trust_env=False,
            read_bufsize=READ_BUFSIZE,
            json_serialize=json.dumps,
        )

    async def aclose(self) -> None:
        await self._http.close()

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion; returns SGLang's JSON response."""
        try:
            async with (
                asyncio.timeout(self._until_headers_s),
                self._http.post(self._url(CHAT_PATH), json=body, allow_redirects=False) as resp,
            ):
                raw = await resp.read()
                status = resp.status
        except TRANSPORT_ERRORS as exc:
            raise _translate(exc) from exc
        if status != 200:
            raise EngineHTTPError(status, _json_or_text(raw, status))
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngineHTTPError(502, {"message": "engine sent invalid JSON"}) from exc
        if not isinstance(data, dict):
            raise EngineHTTPError(502, {"message": "engine sent a non-object JSON body"})
        return data

    async def open_stream(self, body: dict[str, Any]) -> EngineStream:
        """Send a streaming request and return once the response headers are in.

        The caller owns the returned stream and must `aclose()` it.
        """
        try:
            async with asyncio.timeout(self._until_headers_s):
                resp = await self._http.post(self._url(CHAT_PATH), json=body, allow_redirects=False)
        except TRANSPORT_ERRORS as exc:
            raise _translate(exc) from exc
        if resp.status != 200:
            try:
                payload = _json_or_text(await resp.read(), resp.status)
            except TRANSPORT_ERRORS:
                payload = {"message": f"engine returned HTTP {resp.status}"}
            finally:
                resp.close()
            raise EngineHTTPError(resp.status, payload)
        return EngineStream(resp)

    async def abort(self, rid: str) -> bool:
        """Ask SGLang to drop a request and free its KV now."""
        try:
            async with self._http.post(
                self._url("/abort_request"),
                json={"rid": rid},
                timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                await resp.read()
                return resp.status == 200
        except TRANSPORT_ERRORS as exc:
            log.warning("engine.abort_failed", rid=rid, error=_describe(exc))
            return False

    async def probe(self, timeout_s: float) -> Health:
        """SGLang's /health runs a one-token generation and takes a second or more; a
        busy engine may answer late, which is not the same as a dead one."""
        # Only a socket that will not connect means down. Waiting for a pooled
        # connection (every one busy with a stream) or for the answer means slow: the
        # outer timeout, not aiohttp's `connect` (which would include the pool wait).
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout_s, sock_read=timeout_s
        )
        try:
            # Connecting and answering may each take `timeout_s`.
            async with (
                asyncio.timeout(2 * timeout_s),
                self._http.get(
                    self._url("/health"), timeout=timeout, allow_redirects=False
                ) as resp,
            ):
                await resp.read()
                return Health.OK if resp.status == 200 else Health.DOWN
        except aiohttp.ConnectionTimeoutError:
            return Health.DOWN
        except TimeoutError:
            return Health.SLOW
        except TRANSPORT_ERRORS:
            return Health.DOWN

    async def metrics_text(self) -> str | None:
        """SGLang's Prometheus exposition (needs --enable-metrics); None when unreachable."""
        try:
            async with self._http.get(
                self._url("/metrics"), timeout=self._metrics_timeout, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TRANSPORT_ERRORS:
            return None
        return raw.decode("utf-8", errors="replace") if status == 200 else None


def _json_or_text(raw: bytes, status: int) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw[:500].decode("utf-8", errors="replace")
        return {"message": text or f"engine returned HTTP {status}"}
