"""HTTP client for SGLang's own endpoints, on httpx. The gateway never imports SGLang.

Every request goes out once: the transport retries nothing (a POST the engine may have
taken could otherwise start twice), and idle connections are dropped before the engine's
server would close them, so that none is reused as it closes. Bodies and stream lines are
bounded; h11 bounds the response head and checks the framing.

Transport failures become typed exceptions here, so the chat service and the stream
relay map them to OpenAI errors (503, 504) in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

import anyio
import httpx
import structlog

from service import json_codec

log = structlog.get_logger(__name__)

CHAT_PATH = "/v1/chat/completions"
# SGLang's /health (and /health_generate) sends a one-token generation through the
# scheduler: it answers only once the scheduler has produced some output, so it queues
# behind a long prefill. /model_info is answered by the HTTP front end alone.
GENERATE_PROBE_PATH = "/health_generate"
FRONT_END_PROBE_PATH = "/model_info"
# SGLang's router (smg) in front of N engines answers these itself, and a plain engine
# answers 404: the list of its engines, and whether one of them is healthy. The router
# does not serve /model_info (it forwards the older /get_model_info to an engine).
ROUTER_WORKERS_PATH = "/workers"
ROUTER_READINESS_PATH = "/readiness"
ROUTER_MODEL_INFO_PATH = "/get_model_info"
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
# A whole non-streamed answer (n choices with logprobs stay far below it) and one line of
# a stream; an engine sending more is broken, and the gateway must not buffer it all.
MAX_BODY_BYTES = 64 << 20
MAX_LINE_BYTES = 16 << 20


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
    the engine is not taking work; a read or write timeout means it took the connection
    and went silent."""
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        return EngineTimeout(_describe(exc))
    return EngineUnavailable(_describe(exc))


class FramingError(httpx.TransportError):
    """A response the gateway refuses to read on: over a size bound, or framed twice."""


def _check_framing(response: httpx.Response) -> None:
    """h11 lets Transfer-Encoding override Content-Length; a response with both is how
    smuggling starts, so it is refused and its connection closed, never reused."""
    headers = response.headers
    if "transfer-encoding" in headers and "content-length" in headers:
        raise FramingError("engine response has both Transfer-Encoding and Content-Length")


async def _read_bounded(response: httpx.Response) -> bytes:
    limit = MAX_BODY_BYTES
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FramingError(f"engine response of {declared} bytes is over {limit}")
    parts: list[bytes] = []
    size = 0
    async for data in response.aiter_raw():
        size += len(data)
        if size > limit:
            raise FramingError(f"engine response is over {limit} bytes")
        parts.append(data)
    return b"".join(parts)


class EngineStream:
    """An open streaming response. Iterate `line_batches()`; always `aclose()`."""

    def __init__(self, response: httpx.Response, activity: EngineActivity) -> None:
        self._response = response
        # One iterator for the body: the relay reads it up to `[DONE]`, `aclose` drains
        # what is left of it (httpx streams a body once).
        self._chunks = response.aiter_raw()
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

        Raises EngineTimeout or EngineUnavailable when the engine stalls, drops the
        connection or sends a line over MAX_LINE_BYTES mid-stream.
        """
        pending = b""
        try:
            async for data in self._chunks:
                self._activity.progress()
                pending += data
                if b"\n" not in data:
                    if len(pending) > MAX_LINE_BYTES:
                        raise FramingError(f"engine sent a line over {MAX_LINE_BYTES} bytes")
                    continue
                *complete, pending = pending.split(b"\n")
                yield [raw.rstrip(b"\r") for raw in complete]
        except httpx.TransportError as exc:
            raise _translate(exc) from exc
        if pending:
            yield [pending.rstrip(b"\r")]

    async def aclose(self, *, drain: bool = False) -> None:
        """Hand the connection back to the pool if the body was read to its end, else
        close it. `drain`: the stream is logically complete (`[DONE]` seen), so wait
        briefly for the body's terminating chunk, which keeps the connection reusable."""
        try:
            if drain:
                with anyio.move_on_after(DRAIN_TIMEOUT_S):
                    async for _ in self._chunks:
                        pass
        except httpx.TransportError:
            pass
        finally:
            # Even when cancelled mid-drain: a response not read to its end closes its
            # connection (httpcore shields that close), and the pool's slot comes back.
            with anyio.CancelScope(shield=True):
                await self._response.aclose()
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
        self._metrics_timeout_s = metrics_timeout_s
        # Waiting for a pooled connection counts as connecting: an engine whose every
        # connection is busy past the connect timeout is not taking work.
        self._chat_timeout = httpx.Timeout(
            connect=connect_timeout_s,
            pool=connect_timeout_s,
            write=write_timeout_s,
            read=read_timeout_s,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            # retries=0: a connection that fails is never retried with the request on it.
            transport=httpx.AsyncHTTPTransport(
                retries=0,
                limits=httpx.Limits(
                    max_connections=max_connections,
                    max_keepalive_connections=max_connections,
                    keepalive_expiry=KEEPALIVE_S,
                ),
            ),
            timeout=self._chat_timeout,
            # The engine is on a private address: no proxy from the environment, no
            # compression to undo (the relay passes bytes through).
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        )
        self.activity = EngineActivity()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        request = self._http.build_request(
            method,
            path,
            content=None if body is None else json_codec.dumps(body),
            headers=None if body is None else {"Content-Type": "application/json"},
            timeout=timeout or self._chat_timeout,
        )
        response = await self._http.send(request, stream=True)
        try:
            _check_framing(response)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion; returns SGLang's JSON response."""
        self.activity.begin()
        try:
            resp = await self._send("POST", CHAT_PATH, body)
            self.activity.progress()
            try:
                raw = await _read_bounded(resp)
            finally:
                await resp.aclose()
        except httpx.TransportError as exc:
            raise _translate(exc) from exc
        finally:
            self.activity.end()
        status = resp.status_code
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
            resp = await self._send("POST", CHAT_PATH, body)
        except BaseException as exc:
            self.activity.end()
            if isinstance(exc, httpx.TransportError):
                raise _translate(exc) from exc
            raise
        self.activity.progress()
        if resp.status_code != 200:
            self.activity.end()
            try:
                payload = _json_or_text(await _read_bounded(resp), resp.status_code)
            except httpx.TransportError:
                payload = {"message": f"engine returned HTTP {resp.status_code}"}
            finally:
                await resp.aclose()
            raise EngineHTTPError(resp.status_code, payload)
        return EngineStream(resp, self.activity)

    async def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, total_s: float
    ) -> tuple[int, bytes]:
        """A whole exchange bounded by `total_s`."""
        with anyio.fail_after(total_s):
            resp = await self._send(method, path, body, httpx.Timeout(total_s))
            try:
                return resp.status_code, await _read_bounded(resp)
            finally:
                await resp.aclose()

    async def replicas(self) -> list[str]:
        """The engines' URLs when the engine URL is SGLang's router (its worker list), or
        [] for a plain engine (404 there) and when the list cannot be read."""
        try:
            status, raw = await self._exchange(
                "GET", ROUTER_WORKERS_PATH, None, self._metrics_timeout_s
            )
            if status != 200:
                return []
            return [str(w["url"]).rstrip("/") for w in json_codec.loads(raw)["workers"]]
        except (httpx.TransportError, TimeoutError, ValueError, KeyError, TypeError):
            return []

    async def abort(self, rid: str) -> bool:
        """Ask SGLang to drop a request and free its KV now. Behind a router, every engine
        it lists is asked: the one holding `rid` drops it, the others have no such rid."""
        replicas = await self.replicas()
        if not replicas:
            return await self._abort_at("", rid)
        return any(await asyncio.gather(*(self._abort_at(url, rid) for url in replicas)))

    async def _abort_at(self, base: str, rid: str) -> bool:
        try:
            status, _ = await self._exchange(
                "POST", f"{base}/abort_request", {"rid": rid}, ABORT_TIMEOUT_S
            )
        except (httpx.TransportError, TimeoutError) as exc:
            log.warning("engine.abort_failed", rid=rid, engine=base, error=_describe(exc))
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
            with anyio.fail_after(2 * timeout_s):
                resp = await self._send("GET", path, timeout=httpx.Timeout(timeout_s))
                try:
                    await _read_bounded(resp)
                finally:
                    await resp.aclose()
        except httpx.PoolTimeout:
            return Health.SLOW
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return Health.DOWN
        except (httpx.ReadTimeout, httpx.WriteTimeout, TimeoutError):
            return Health.SLOW
        except httpx.TransportError:
            return Health.DOWN
        if resp.status_code == 404 and path == FRONT_END_PROBE_PATH:
            # A router: its own readiness says whether one of its engines is healthy.
            return await self.probe(timeout_s, ROUTER_READINESS_PATH)
        if resp.status_code != 200:
            return Health.DOWN
        if path == GENERATE_PROBE_PATH:
            self.activity.progress()  # the scheduler produced output just now
        return Health.OK

    async def metrics_text(self, base: str = "") -> str | None:
        """SGLang's Prometheus exposition (needs --enable-metrics) of the engine, or of the
        engine at `base`; None when unreachable."""
        try:
            status, raw = await self._exchange(
                "GET", f"{base}/metrics", None, self._metrics_timeout_s
            )
        except (httpx.TransportError, TimeoutError):
            return None
        return raw.decode("utf-8", errors="replace") if status == 200 else None

    async def replica_metrics(self) -> dict[str, str | None] | str | None:
        """Behind a router, each engine's exposition by its URL (None where it did not
        answer); otherwise the one engine's."""
        replicas = await self.replicas()
        if not replicas:
            return await self.metrics_text()
        texts = await asyncio.gather(*(self.metrics_text(url) for url in replicas))
        return dict(zip(replicas, texts, strict=True))

    async def model_info(self) -> dict[str, Any] | None:
        """SGLang's /model_info (the served model and its parsers); None when unreachable."""
        try:
            status, raw = await self._exchange(
                "GET", FRONT_END_PROBE_PATH, None, self._metrics_timeout_s
            )
            if status == 404:  # a router: it forwards the older path to an engine
                status, raw = await self._exchange(
                    "GET", ROUTER_MODEL_INFO_PATH, None, self._metrics_timeout_s
                )
            info = json_codec.loads(raw) if status == 200 else None
        except (httpx.TransportError, TimeoutError, ValueError):
            return None
        return info if isinstance(info, dict) else None


def _json_or_text(raw: bytes, status: int) -> Any:
    try:
        return json_codec.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw[:500].decode("utf-8", errors="replace")
        return {"message": text or f"engine returned HTTP {status}"}
