"""Relaying SGLang's SSE stream to the client.

Chunks pass through byte-for-byte except the usage chunk, which gains `usage.kv_cache`
(and is dropped if the client did not ask for usage), and SGLang's error events, which
are rewritten into OpenAI's error shape. Any failure mid-stream becomes an error event
followed by `data: [DONE]`, because the status line has long been sent.

`RelayResponse` owns the ASGI exchange as Starlette's streaming response does: the relay
runs in an anyio task group beside a watcher of `http.disconnect`, so a client that hangs
up is seen at once, even while the engine is silent; a drain's cut cancels the same
scope. Clean-up runs exactly once, shielded, whether the stream ended, the client left or
the request's task was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service import json_codec
from service.api.errors import ErrorBody, ErrorDetail, clean_engine_message
from service.chat.disconnect_guard import wait_disconnect
from service.chat.kv_policy import EffectivePolicy, KvCacheUsage
from service.engine.client import EngineStream, EngineTimeout, EngineUnavailable

log = structlog.get_logger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_raw(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def sse(payload: str) -> bytes:
    return sse_raw(payload.encode())


# SGLang serializes chunks compactly (pydantic's model_dump_json), so a token chunk says
# `"usage":null`. A chunk is parsed when it may carry an error or a usage object: when it
# holds `"error"`, or more `"usage"` than `"usage":null`. Text inside a string value
# can only add to the first count (its quotes are escaped, so `"usage":null` cannot
# appear in it whole), which costs a parse, never a missed usage chunk; the same holds
# for any other serialization.
_ERROR_KEY = b'"error"'
_USAGE_KEY = b'"usage"'
_NO_USAGE = b'"usage":null'


def error_event(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    body = ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return sse(body.model_dump_json())


# The end of a stream the drain cut; docs/api.md documents it.
_CUT_EVENT = error_event(
    "The server is shutting down; the stream was cut before it finished",
    "server_error",
    "shutting_down",
)


def normalize_engine_error(payload: Any) -> bytes:
    detail = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    status = detail.get("code")
    is_client = isinstance(status, int) and 400 <= status < 500
    # The same cleaning as a non-streamed engine error: no paths, dumps or Python
    # messages reach the client, only the field they were about.
    message, param = clean_engine_message(str(detail.get("message") or "engine error"))
    given = detail.get("param")
    return error_event(
        message,
        "invalid_request_error" if is_client else "server_error",
        f"engine_error_{status}" if status is not None else "engine_error",
        given if isinstance(given, str) else param,
    )


# SGLang's router (smg) ends a stream whose engine connection broke with an error event
# of its own, `{"error": {"message": "Stream error: ..."}}` and no status code, then
# `[DONE]`: the same failure as an engine that dropped the gateway's own connection.
_ROUTER_STREAM_ERROR = "Stream error:"


def _router_lost_engine(chunk: dict[str, Any]) -> bool:
    detail = chunk.get("error")
    return (
        isinstance(detail, dict)
        and not isinstance(detail.get("code"), int)
        and str(detail.get("message", "")).startswith(_ROUTER_STREAM_ERROR)
    )


def has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


@dataclass
class StreamResult:
    """What the relay observed; read by the chat service when the stream ends."""

    outcome: str = "stream_error"
    first_token_at: float | None = None
    usage: dict[str, Any] | None = None
    kv: KvCacheUsage | None = None
    finished: bool = False
    engine_errors: list[str] = field(default_factory=list)


class StreamRelay:
    def __init__(
        self,
        upstream: EngineStream,
        policy: EffectivePolicy,
        *,
        include_usage: bool,
        on_finish: Callable[[StreamRelay, bool], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._policy = policy
        self._include_usage = include_usage
        self._on_finish = on_finish
        self._finish_called = False
        self._cut = False
        # The scope the relay runs in (RelayResponse's): a cut cancels it.
        self.scope: anyio.CancelScope | None = None
        self.result = StreamResult()

    def cut(self) -> None:
        """End the stream now (the server is shutting down): the pending read is
        cancelled and the client gets a `shutting_down` error event and `[DONE]`."""
        if not self.result.finished:
            self._cut = True
            if self.scope is not None:
                self.scope.cancel()

    @property
    def cut_requested(self) -> bool:
        return self._cut

    def cut_tail(self) -> bytes | None:
        """The last write of a stream the drain cut before it ended; None otherwise."""
        if not self._cut or self.result.finished:
            return None
        self.result.outcome = "shutting_down"
        self.result.finished = True
        return _CUT_EVENT + DONE

    async def events(self) -> AsyncIterator[bytes]:
        """The client's stream, one item per write. The last item ends with `[DONE]` and
        carries whatever came with the engine's `[DONE]` (usually the usage chunk): one
        write, not two, at the end of every stream."""
        saw_done = False
        tail: list[bytes] = []
        try:
            async for batch in self._upstream.line_batches():
                out: list[bytes] = []
                for line in batch:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        saw_done = True
                        break
                    event = self._on_chunk(data)
                    if event is not None:
                        out.append(event)
                if saw_done:
                    tail = out
                    break
                if out:
                    yield b"".join(out)
            if saw_done:
                if self.result.outcome not in ("engine_error", "engine_unavailable"):
                    self.result.outcome = "success"
            else:
                tail = self._ended_early(
                    "The inference engine closed the stream before it finished"
                )
        except EngineTimeout:
            self.result.outcome = "upstream_timeout"
            tail = [
                error_event(
                    "The inference engine stopped sending tokens",
                    "server_error",
                    "upstream_timeout",
                )
            ]
        except EngineUnavailable:
            tail = self._ended_early("The inference engine connection failed mid-stream")
        self.result.finished = True
        yield b"".join(tail) + DONE

    def _ended_early(self, message: str) -> list[bytes]:
        """The last event of a stream that ended before the engine's `[DONE]`."""
        self.result.outcome = "engine_unavailable"
        return [error_event(message, "server_error", "engine_unavailable")]

    def _needs_parse(self, data: bytes) -> bool:
        return (
            self.result.first_token_at is None
            or _ERROR_KEY in data
            or data.count(_USAGE_KEY) != data.count(_NO_USAGE)
        )

    def _on_chunk(self, data: bytes) -> bytes | None:
        if not self._needs_parse(data):
            return sse_raw(data)
        try:
            chunk = json_codec.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return sse_raw(data)
        if not isinstance(chunk, dict):
            return sse_raw(data)
        if _router_lost_engine(chunk):
            self.result.engine_errors.append(str(chunk["error"])[:200])
            return self._ended_early("The inference engine connection failed mid-stream")[0]
        if "error" in chunk:
            self.result.outcome = "engine_error"
            self.result.engine_errors.append(str(chunk["error"])[:200])
            return normalize_engine_error(chunk)
        if self.result.first_token_at is None and has_token(chunk):
            self.result.first_token_at = time.monotonic()
        usage = chunk.get("usage")
        if isinstance(usage, dict) and not chunk.get("choices"):
            kv = KvCacheUsage.merge(self._policy, usage.get("kv_cache"))
            usage["kv_cache"] = kv.model_dump()
            self.result.usage = usage
            self.result.kv = kv
            return sse_raw(json_codec.dumps(chunk)) if self._include_usage else None
        return sse_raw(data)

    async def finish(self, client_gone: bool) -> None:
        """Run once: close the upstream and hand over to the chat service's clean-up."""
        if self._finish_called:
            return
        self._finish_called = True
        disconnected = client_gone and not self.result.finished
        if disconnected:
            self.result.outcome = "client_disconnected"
        try:
            await self._upstream.aclose(drain=self.result.outcome == "success")
        finally:
            await self._on_finish(self, disconnected)


class RelayResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, relay: StreamRelay, headers: dict[str, str] | None = None) -> None:
        self.relay = relay
        self.status_code = 200
        self.background = None
        self._client_gone = False
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.relay.events()
        # Stream over, client gone, cut or this task cancelled: the clean-up runs to its
        # end either way, once, or the request's slot and its connection would leak.
        try:
            await self._relay(receive, send, events)
        except asyncio.CancelledError:
            await _shielded(self._end(events), cancelled=True)
            raise
        except BaseException:
            await _shielded(self._end(events))
            raise
        await _shielded(self._end(events))

    async def _relay(self, receive: Receive, send: Send, events: AsyncIterator[bytes]) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        except OSError:
            self._client_gone = True
            return
        async with anyio.create_task_group() as group:
            self.relay.scope = group.cancel_scope
            if self.relay.cut_requested:  # cut before it started
                group.cancel_scope.cancel()

            async def watch() -> None:
                with contextlib.suppress(Exception):  # a failed receive: gone too
                    await wait_disconnect(receive)
                self._client_gone = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            if await self._pump(send, events):
                self._client_gone = True
            group.cancel_scope.cancel()
        tail = None if self._client_gone else self.relay.cut_tail()
        if tail is not None:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _pump(self, send: Send, events: AsyncIterator[bytes]) -> bool:
        """Relay the stream; True when the client turned out to be gone."""
        try:
            async for chunk in events:
                # The relay's last item (it always yields one) ends the response.
                last = self.relay.result.finished
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        except OSError:
            return True
        return False

    async def _end(self, events: AsyncGenerator[bytes, None]) -> None:
        try:
            await events.aclose()
        finally:
            await self.relay.finish(self._client_gone)


async def _shielded(work: Coroutine[Any, Any, None], *, cancelled: bool = False) -> None:
    """Run `work` to its end even if the caller is cancelled meanwhile, however often (or
    already was: `cancelled`); the cancellation is then raised, and a failure of `work`
    logged rather than raised in its place. An anyio shielded scope does not hold off a
    plain `Task.cancel()`, which is how a server's shutdown cancels a request."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # the work itself was cancelled (loop shutting down)
                raise
            cancelled = True
        except BaseException:
            break  # the work failed: raised or logged below
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            log.error("stream.cleanup_failed", error=repr(task.exception()))
        raise asyncio.CancelledError
    task.result()
