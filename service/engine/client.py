"""HTTP client for SGLang's own endpoints. The gateway never imports SGLang.

The HTTP itself is service/engine/http_pool.py, a small keep-alive HTTP/1.1 client: the
upstream hop is on every request's path, and general-purpose clients cost most of the
gateway's cold path (see docs/benchmarks.md, "Gateway overhead").

Transport failures become typed exceptions here, so the chat service and the stream
relay map them to OpenAI errors (503, 504) in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

import structlog

from service import json_codec
from service.engine.http_pool import (
    ConnectFailed,
    HttpTransportError,
    Pool,
    Response,
    ResponseTimeout,
)

log = structlog.get_logger(__name__)

CHAT_PATH = "/v1/chat/completions"
# SGLang's /health (and /health_generate) sends a one-token generation through the
# scheduler: it answers only once the scheduler has produced some output, so it queues
# behind a long prefill. /model_info is answered by the HTTP front end alone.
GENERATE_PROBE_PATH = "/health_generate"
FRONT_END_PROBE_PATH = "/model_info"
ABORT_TIMEOUT_S = 5.0
# After `[DONE]` the engine ends the body at once; a keep-alive connection is worth a
# short wait for that, not more.
DRAIN_TIMEOUT_S = 0.2
# Bounds writing the request, for an engine that accepts a connection and then stops
# reading; the read timeout for the response head starts after it.
WRITE_TIMEOUT_S = 30.0
# Idle pooled connections are dropped before the engine's server would close them
# (uvicorn: 5 s), so that a request never goes out on a connection being closed.
KEEPALIVE_S = 4.0


class Health(StrEnum):
    OK = "ok"
    # The scheduler did not answer, but requests in flight have shown progress lately.
    BUSY = "busy"
    SLOW = "slow"  # accepted the connection, no answer within the probe's timeout
    DOWN = "down"  # refused, reset, or answered with an error status


class EngineActivity:
    """What the gateway has in flight at the engine, and when the engine last showed
    progress on it (a response head, body bytes, a generation probe answered).

    The supervisor reads it to tell a busy engine (a long prefill answers nothing for
    minutes) from a hung one: silence only counts while work is in flight, and its clock
    starts when the work does, not at the last progress of an earlier, idle period.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_progress = time.monotonic()

    def begin(self) -> None:
        if self.in_flight == 0:
            self.last_progress = time.monotonic()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_progress


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
    """A transport failure -> ours. Not connecting (or no free connection in time) means
    the engine is not taking work; a read timeout means it took the request and went
    silent."""
    if isinstance(exc, ResponseTimeout):
        return EngineTimeout(_describe(exc))
    return EngineUnavailable(_describe(exc))


# What a failed exchange with the engine can raise.
TRANSPORT_ERRORS = (HttpTransportError, TimeoutError, OSError)


class EngineStream:
    """An open streaming response. Iterate `line_batches()`; always `aclose()`."""

    def __init__(self, response: Response, read_timeout_s: float, activity: EngineActivity) -> None:
        self._response = response
        self._read_timeout_s = read_timeout_s
        self._activity = activity
        self._ended = False

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._activity.end()

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
            async for data in self._response.iter_data(self._read_timeout_s):
                self._activity.progress()
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
        try:
            if drain and not self._response.at_end:
                try:
                    async with asyncio.timeout(DRAIN_TIMEOUT_S):
                        async for _ in self._response.iter_data(None):
                            pass
                except TRANSPORT_ERRORS:
                    pass
        finally:
            # Even when cancelled mid-drain: a response not read to its end closes its
            # connection, and the pool's slot comes back either way.
            self._response.release()
            self._end()

    def close(self) -> None:
        """Drop the connection now (a stream nobody will read: no drain, no reuse)."""
        self._response.close()
        self._end()


class EngineClient:
    """One connection pool per gateway. Create it inside the running event loop (the
    app's lifespan)."""

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
        self._connect_timeout_s = connect_timeout_s
        self._metrics_timeout_s = metrics_timeout_s
        self._write_timeout_s = write_timeout_s
        self._pool = Pool(self.base_url, limit=max_connections, keepalive_s=KEEPALIVE_S)
        self.activity = EngineActivity()

    async def aclose(self) -> None:
        self._pool.close()

    async def _post(self, path: str, body: dict[str, Any]) -> Response:
        return await self._pool.request(
            "POST",
            path,
            json_codec.dumps(body),
            # Waiting for a pooled connection counts as connecting: an engine whose
            # every connection is busy past the connect timeout is not taking work.
            slot_and_connect_timeout_s=self._connect_timeout_s,
            write_timeout_s=self._write_timeout_s,
            head_timeout_s=self.read_timeout_s,
        )

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion; returns SGLang's JSON response."""
        self.activity.begin()
        try:
            resp = await self._post(CHAT_PATH, body)
            self.activity.progress()
            try:
                raw = await resp.read(self.read_timeout_s)
            finally:
                resp.release()
        except TRANSPORT_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self.activity.end()
        status = resp.status
        if status != 200:
            raise EngineHTTPError(status, _json_or_text(raw, status))
        try:
            data = json_codec.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngineHTTPError(502, {"message": "engine sent invalid JSON"}) from exc
        if not isinstance(data, dict):
            raise EngineHTTPError(502, {"message": "engine sent a non-object JSON body"})
        return data

    async def open_stream(self, body: dict[str, Any]) -> EngineStream:
        """Send a streaming request and return once the response headers are in.

        The caller owns the returned stream and must `aclose()` it.
        """
        self.activity.begin()
        try:
            resp = await self._post(CHAT_PATH, body)
        except BaseException as exc:
            self.activity.end()
            if isinstance(exc, TRANSPORT_ERRORS):
                raise _translate(exc) from exc
            raise
        self.activity.progress()
        if resp.status != 200:
            self.activity.end()
            try:
                payload = _json_or_text(await resp.read(self.read_timeout_s), resp.status)
            except TRANSPORT_ERRORS:
                payload = {"message": f"engine returned HTTP {resp.status}"}
            finally:
                resp.release()
            raise EngineHTTPError(resp.status, payload)
        return EngineStream(resp, self.read_timeout_s, self.activity)

    async def _get_or_post(
        self, method: str, path: str, body: dict[str, Any] | None, total_s: float
    ) -> tuple[int, bytes]:
        """A whole exchange bounded by `total_s`."""
        async with asyncio.timeout(total_s):
            resp = await self._pool.request(
                method,
                path,
                None if body is None else json_codec.dumps(body),
            )
            try:
                return resp.status, await resp.read(None)
            finally:
                resp.release()

    async def abort(self, rid: str) -> bool:
        """Ask SGLang to drop a request and free its KV now."""
        try:
            status, _ = await self._get_or_post(
                "POST", "/abort_request", {"rid": rid}, ABORT_TIMEOUT_S
            )
        except TRANSPORT_ERRORS as exc:
            log.warning("engine.abort_failed", rid=rid, error=_describe(exc))
            return False
        return status == 200

    async def probe(self, timeout_s: float, path: str = GENERATE_PROBE_PATH) -> Health:
        """One health probe. The generation probe takes a second or more and a busy
        engine may answer it late, which is not the same as a dead one; the front-end
        probe answers at once unless SGLang's HTTP process is gone or wedged."""
        # Only a socket that will not connect means down. Waiting for a pooled
        # connection (every one busy with a stream) or for the answer means slow.
        try:
            # Connecting and answering may each take `timeout_s`.
            async with asyncio.timeout(2 * timeout_s):
                resp = await self._pool.request(
                    "GET",
                    path,
                    connect_timeout_s=timeout_s,
                    head_timeout_s=timeout_s,
                )
                try:
                    await resp.read(timeout_s)
                finally:
                    resp.release()
        except ConnectFailed:
            return Health.DOWN
        except TimeoutError:  # the outer bound, the pool wait or the answer
            return Health.SLOW
        except TRANSPORT_ERRORS:
            return Health.DOWN
        if resp.status != 200:
            return Health.DOWN
        if path == GENERATE_PROBE_PATH:
            self.activity.progress()  # the scheduler produced output just now
        return Health.OK

    async def metrics_text(self) -> str | None:
        """SGLang's Prometheus exposition (needs --enable-metrics); None when unreachable."""
        try:
            status, raw = await self._get_or_post("GET", "/metrics", None, self._metrics_timeout_s)
        except TRANSPORT_ERRORS:
            return None
        return raw.decode("utf-8", errors="replace") if status == 200 else None

    async def model_info(self) -> dict[str, Any] | None:
        """SGLang's /model_info (the served model and its parsers); None when unreachable."""
        try:
            status, raw = await self._get_or_post(
                "GET", FRONT_END_PROBE_PATH, None, self._metrics_timeout_s
            )
            info = json_codec.loads(raw) if status == 200 else None
        except (*TRANSPORT_ERRORS, ValueError):
            return None
        return info if isinstance(info, dict) else None


def _json_or_text(raw: bytes, status: int) -> Any:
    try:
        return json_codec.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw[:500].decode("utf-8", errors="replace")
        return {"message": text or f"engine returned HTTP {status}"}
