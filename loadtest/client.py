"""One streaming chat request -> one `RequestRecord` with a timestamp per content chunk.

Timing follows SGLang's bench_serving (`async_request_openai_chat_completions`): the clock
starts just before the request is sent; TTFT is the arrival of the first chunk carrying
content (or reasoning content); ITL is the gap between consecutive content chunks; latency
ends at the last SSE event received (normally `[DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestRecord:
    """What one request did. Times are seconds on the run's clock (0 = run start)."""

    index: int
    policy: str
    start_s: float = 0.0
    end_s: float = 0.0
    # HTTP status; None when no response arrived (connection error, timeout, cancelled).
    status: int | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    kv_cache: dict[str, Any] | None = None
    saw_done: bool = False
    # From the error body of a non-200 answer or an SSE error event, else our own:
    # `timeout`, `transport_error`, `cancelled`, `no_done` (stream ended without [DONE]).
    error_code: str | None = None
    error_type: str | None = None
    error_in_stream: bool = False
    retry_after_s: float | None = None

    @property
    def success(self) -> bool:
        return self.status == 200 and self.saw_done and self.error_code is None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def output_tokens(self) -> int:
        """Server-counted completion tokens; content chunks when no usage came back."""
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks

    @property
    def outcome(self) -> str:
        """`ok`, the HTTP status of a refused request, `stream_error`, or our error code."""
        if self.success:
            return "ok"
        if self.status is None:
            return self.error_code or "transport_error"
        if self.status != 200:
            return str(self.status)
        return "stream_error" if self.error_in_stream else (self.error_code or "no_done")


def chat_body(
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float,
    kv_policy: dict[str, Any] | None,
    ignore_eos: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        # The usage chunk carries completion_tokens (for TPOT) and usage.kv_cache.
        "stream_options": {"include_usage": True},
    }
    if kv_policy is not None:
        body["kv_policy"] = kv_policy
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


def _read_error(record: RequestRecord, payload: Any) -> None:
    detail = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(detail, dict):
        record.error_code = str(detail.get("code") or "error")
        record.error_type = str(detail.get("type") or "") or None
    else:
        record.error_code = "malformed_error"


async def stream_chat(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: RequestRecord,
    clock_zero: float,
) -> RequestRecord:
    """Send one streaming request, filling `record` in place (also when cancelled)."""
    start = time.perf_counter()
    record.start_s = start - clock_zero
    last_event = start
    last_content: float | None = None
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                raw = await response.aread()
                last_event = time.perf_counter()
                retry_after = response.headers.get("retry-after")
                if retry_after is not None and retry_after.strip().isdigit():
                    record.retry_after_s = float(retry_after)
                try:
                    _read_error(record, json.loads(raw))
                except json.JSONDecodeError:
                    record.error_code = "malformed_error"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                last_event = now
                data = line[5:].strip()
                if data == "[DONE]":
                    record.saw_done = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise json.JSONDecodeError("expected a JSON object", data, 0)
                if "error" in chunk:
                    record.error_in_stream = True
                    _read_error(record, chunk)
                    continue
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
                    record.kv_cache = usage.get("kv_cache")
                if _has_content(chunk):
                    record.content_chunks += 1
                    if last_content is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last_content)
                    last_content = now
            if not record.saw_done and record.error_code is None:
                record.error_code = "no_done"
    except httpx.TimeoutException:
        last_event = time.perf_counter()
        record.error_code = "timeout"
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        last_event = time.perf_counter()
        record.error_code = (
            "malformed_event" if isinstance(exc, json.JSONDecodeError) else "transport_error"
        )
    except asyncio.CancelledError:
        last_event = time.perf_counter()
        record.error_code = "cancelled"
        raise
    finally:
        record.end_s = last_event - clock_zero
    return record
