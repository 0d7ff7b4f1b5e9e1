"""One chat completion, end to end: check, resolve the KV policy, admit, forward, relay,
record. Routes stay thin; everything a request goes through is readable here in order.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from service.api import errors
from service.api.api_keys import ApiKey
from service.api.schemas import ChatCompletionRequest
from service.chat import kv_policy
from service.chat import request as chat_request
from service.chat.admission import AdmissionController, AdmissionRejected, Ticket
from service.chat.disconnect_guard import ClientDisconnected, until_disconnect
from service.chat.kv_policy import EffectivePolicy, KvCacheUsage, PolicyLimits
from service.chat.stream_relay import RelayResponse, StreamRelay
from service.engine.client import (
    EngineClient,
    EngineHTTPError,
    EngineStream,
    EngineTimeout,
    EngineUnavailable,
)
from service.engine.supervisor import EngineMonitor
from service.json_codec import FastJSONResponse
from service.server.drain import Drain
from service.server.metrics import GatewayMetrics
from service.server.settings import Settings

log = structlog.get_logger(__name__)

UNRESOLVED = "unresolved"
# How long the engine's tool-call parser is trusted before it is read again (a remote
# engine may be restarted with another configuration).
TOOL_PARSER_TTL_S = 30.0


@dataclass
class Call:
    """One request's identity and choices, carried through its lifetime."""

    rid: str
    policy: EffectivePolicy
    stream: bool
    include_usage: bool
    key: ApiKey | None
    started: float
    ticket: Ticket | None = None


class ChatService:
    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        monitor: EngineMonitor,
        admission: AdmissionController,
        metrics: GatewayMetrics,
        drain: Drain,
    ) -> None:
        self._settings = settings
        self._drain = drain
        self._engine = engine
        self._monitor = monitor
        self._admission = admission
        self._metrics = metrics
        self._background: set[asyncio.Task[Any]] = set()
        # Without API keys every request has the server's limits: worked out once.
        self._server_limits = PolicyLimits.for_caller(settings, None)
        # When the engine's tool-call parser was last read, and what it is (None: none).
        self._tool_parser: tuple[float, str | None] | None = None

    async def aclose(self) -> None:
        """Let in-flight aborts reach the engine before the client closes."""
        if self._background:
            await asyncio.wait(self._background, timeout=5)

    async def complete(
        self, request: Request, req: ChatCompletionRequest, key: ApiKey | None
    ) -> Response:
        started = time.monotonic()
        stream = req.stream
        try:
            chat_request.check_values(req, self._settings)
            policy = kv_policy.resolve_request(
                req.kv_policy,
                request.headers.get(kv_policy.HEADER),
                self._server_limits
                if key is None
                else PolicyLimits.for_caller(self._settings, key),
            )
            if chat_request.uses_tools(req):
                await self._check_tool_calls()
        except errors.OpenAIError:
            self._metrics.record_outcome(policy=UNRESOLVED, stream=stream, outcome="invalid")
            raise

        call = Call(
            rid=f"chatcmpl-{uuid.uuid4().hex}",
            policy=policy,
            stream=stream,
            include_usage=chat_request.wants_usage_chunk(req),
            key=key,
            started=started,
        )
        logger = log.bind(rid=call.rid, key=key.label if key else None, policy=policy.name)

        if self._drain.active:
            self._outcome(call, "draining")
            raise errors.draining(self._settings.retry_after_s)
        if not self._monitor.ready:
            self._outcome(call, "engine_unavailable")
            raise errors.engine_unavailable(
                f"The inference engine is {self._monitor.state.value}; retry later",
                self._settings.engine_retry_after_s,
            )

        call.ticket = await self._admit(request, call)
        self._metrics.queue_wait.observe(call.ticket.queued_s)
        body = chat_request.upstream_body(req, policy, call.rid, self._settings, key)
        headers = {"X-Request-Id": call.rid}
        handed_off = False
        try:
            try:
                sent = await self._send(request, body)
            except EngineHTTPError as exc:
                # The default cap is ours, not the client's: past the context it is cut
                # down to what the prompt leaves, not answered with a 400.
                fitted = chat_request.fit_default_cap(req, body, exc.payload)
                if fitted is None:
                    raise
                sent = await self._send(request, fitted)
            if isinstance(sent, EngineStream):
                relay = StreamRelay(
                    sent,
                    policy,
                    include_usage=call.include_usage,
                    on_finish=functools.partial(self._stream_done, call),
                )
                # From here the relay owns the ticket and releases it when the stream ends.
                handed_off = True
                self._drain.track(relay)
                return RelayResponse(relay, headers=headers)
            data = sent
        except ClientDisconnected:
            self._abort(call, "client_disconnected")
            self._outcome(call, "client_disconnected")
            logger.info("chat.client_disconnected")
            return Response(status_code=errors.CLIENT_CLOSED)
        except EngineTimeout as exc:
            self._abort(call, "upstream_timeout")
            self._outcome(call, "upstream_timeout")
            raise errors.upstream_timeout(self._settings.upstream_timeout_s) from exc
        except EngineUnavailable as exc:
            self._outcome(call, "engine_unavailable")
            logger.warning("chat.engine_unavailable", error=str(exc))
            raise errors.engine_unavailable(
                retry_after_s=self._settings.engine_retry_after_s
            ) from exc
        except EngineHTTPError as exc:
            self._outcome(call, "engine_error")
            logger.info("chat.engine_rejected", status=exc.status_code)
            raise errors.from_engine_payload(exc.status_code, exc.payload) from exc
        finally:
            if call.ticket is not None and not handed_off:
                call.ticket.release()

        kv = self._attach_kv_usage(data, policy)
        # The first token came the engine's decode time before the answer.
        decode_s = chat_request.engine_decode_s(data)
        first_token_at = None if decode_s is None else time.monotonic() - decode_s
        # Recorded once the response is on its way: the client need not wait for it.
        # Nothing runs in between (no await), so a request that follows sees it counted.
        done = BackgroundTask(self._completed, call, data.get("usage") or {}, kv, first_token_at)
        return FastJSONResponse(data, headers=headers, background=done)

    async def _check_tool_calls(self) -> None:
        """400 unless the engine parses tool calls: without a parser SGLang answers a tool
        call as plain text with finish "stop", which a client cannot tell from a reply."""
        now = time.monotonic()
        if self._tool_parser is None or now - self._tool_parser[0] > TOOL_PARSER_TTL_S:
            info = await self._engine.model_info()
            if info is None:
                return  # unreachable: the readiness check answers for it
            self._tool_parser = (now, info.get("tool_call_parser") or None)
        if self._tool_parser[1] is None:
            raise errors.invalid_field(
                "tools",
                f"Function calling is not available on this server: the model "
                f"{self._settings.model_name!r} is served without a tool-call parser (its "
                "chat template has no tool-call format)",
                code="tools_not_supported",
            )

    async def _send(self, request: Request, body: dict[str, Any]) -> EngineStream | dict[str, Any]:
        if body.get("stream"):
            return await until_disconnect(
                request.receive, self._engine.open_stream(body), on_orphan=_close_stream
            )
        return await until_disconnect(request.receive, self._engine.chat(body))

    async def _completed(
        self,
        call: Call,
        usage: dict[str, Any],
        kv: KvCacheUsage,
        first_token_at: float | None,
    ) -> None:
        """A successful request's metrics and log line, streamed or not."""
        seconds = time.monotonic() - call.started
        self._metrics.record_success(
            policy=call.policy.name,
            stream=call.stream,
            e2e_s=seconds,
            ttft_s=(first_token_at - call.started) if first_token_at else None,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            kv=kv,
        )
        log.info(
            "chat.completed",
            rid=call.rid,
            key=call.key.label if call.key else None,
            policy=call.policy.name,
            stream=call.stream,
            seconds=round(seconds, 4),
            completion_tokens=usage.get("completion_tokens"),
        )

    async def _admit(self, request: Request, call: Call) -> Ticket:
        key_id: str | None = None
        key_limit: int | None = None
        if call.key is not None:
            key_id = call.key.digest
            key_limit = call.key.max_concurrency or self._settings.per_key_max_concurrency
        try:
            ticket = self._admission.try_acquire(key_id, key_limit)
            if ticket is not None:
                return ticket
            # `acquire` tries again before it queues: a slot freed before its task runs
            # must be taken, not waited for. A ticket won just as the client leaves would
            # hold its slot forever: it is released.
            return await until_disconnect(
                request.receive,
                self._admission.acquire(key_id, key_limit),
                on_orphan=_release_ticket,
            )
        except AdmissionRejected as exc:
            self._metrics.admission_rejections.labels(exc.reason.value).inc()
            self._outcome(call, "rejected")
            raise errors.overloaded(
                str(exc), exc.reason.value, self._settings.retry_after_s
            ) from exc
        except ClientDisconnected:
            self._outcome(call, "client_disconnected")
            raise errors.client_closed() from None

    async def _stream_done(self, call: Call, relay: StreamRelay, disconnected: bool) -> None:
        self._drain.untrack(relay)
        if call.ticket is not None:
            call.ticket.release()
        result = relay.result
        if result.outcome in ("client_disconnected", "upstream_timeout", "shutting_down"):
            self._abort(call, result.outcome)
        if result.outcome != "success":
            self._outcome(call, result.outcome)
            log.info(
                "chat.stream_ended",
                rid=call.rid,
                outcome=result.outcome,
                engine_errors=result.engine_errors or None,
            )
            return
        kv = result.kv or KvCacheUsage.merge(call.policy, None)
        await self._completed(call, result.usage or {}, kv, result.first_token_at)

    def _attach_kv_usage(self, data: dict[str, Any], policy: EffectivePolicy) -> KvCacheUsage:
        usage = data.get("usage")
        if not isinstance(usage, dict):
            usage = data["usage"] = {}
        kv = KvCacheUsage.merge(policy, usage.get("kv_cache"))
        usage["kv_cache"] = kv.model_dump()
        return kv

    def _abort(self, call: Call, reason: str) -> None:
        """Free the request's KV in SGLang now, without holding up the response."""
        self._metrics.engine_aborts.labels(reason).inc()
        task = asyncio.create_task(self._engine.abort(call.rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _outcome(self, call: Call, outcome: str) -> None:
        self._metrics.record_outcome(policy=call.policy.name, stream=call.stream, outcome=outcome)


async def _close_stream(stream: EngineStream) -> None:
    await stream.aclose()


async def _release_ticket(ticket: Ticket) -> None:
    ticket.release()
