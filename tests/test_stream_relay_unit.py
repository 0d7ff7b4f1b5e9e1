"""The stream relay's chunk handling, fed SGLang's exact serialization (pydantic's
compact `model_dump_json`, `"usage":null` on token chunks). The relay over real sockets
is in test_gateway_contract.py; here the upstream is a list of lines, so that what is
passed through untouched and what is rewritten can be checked byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from service.engine_client import EngineTimeout
from service.kv_policy import EffectivePolicy, KvCacheUsage
from service.stream_relay import StreamRelay

POLICY = EffectivePolicy(name="raas", budget_tokens=256, alpha=0.1)


def chunk(content: str | None, usage: dict | None = None, choices: bool = True) -> bytes:
    body = {
        "id": "r",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
        if choices
        else [],
        "usage": usage,
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Lines:
    def __init__(
        self, lines: list[bytes], fail: Exception | None = None, one_read: bool = False
    ) -> None:
        self._lines = lines
        self._fail = fail
        self._one_read = one_read
        self.drained: bool | None = None

    async def line_batches(self) -> AsyncIterator[list[bytes]]:
        if self._one_read:  # a burst: everything arrived in one network read
            yield self._lines
        else:  # one event per read, as an engine sends one per decode step
            for line in self._lines:
                yield [line]
        if self._fail is not None:
            raise self._fail

    async def aclose(self, *, drain: bool = False) -> None:
        self.drained = drain


def relay_all(upstream: Lines, include_usage: bool = True) -> tuple[list[bytes], StreamRelay]:
    finished: list[bool] = []

    async def on_finish(relay: StreamRelay, disconnected: bool) -> None:
        finished.append(disconnected)

    relay = StreamRelay(upstream, POLICY, include_usage=include_usage, on_finish=on_finish)

    async def run() -> list[bytes]:
        out = [event async for event in relay.events()]
        await relay.finish(client_gone=False)
        return out

    events = asyncio.run(run())
    assert finished == [False]
    return events, relay


def test_token_chunks_pass_through_byte_for_byte_and_usage_gains_kv_cache():
    tokens = [chunk(""), chunk("Hello"), chunk(' "error" and "usage":{} in text'), chunk("!")]
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    final = chunk(None, usage=usage, choices=False)
    upstream = Lines([b"data: " + t for t in tokens] + [b"", b"data: " + final, b"data: [DONE]"])
    events, relay = relay_all(upstream)
    assert events[:4] == [b"data: " + t + b"\n\n" for t in tokens]
    sent_usage = json.loads(events[4].removeprefix(b"data: "))["usage"]
    assert sent_usage["completion_tokens"] == 3
    assert sent_usage["kv_cache"] == KvCacheUsage.merge(POLICY, None).model_dump()
    assert events[5:] == [b"data: [DONE]\n\n"]
    assert relay.result.outcome == "success" and relay.result.first_token_at is not None
    assert relay.result.usage == sent_usage
    assert upstream.drained is True  # the connection may go back to the pool


def test_first_token_is_the_first_chunk_with_content():
    upstream = Lines([b"data: " + chunk(""), b"data: " + chunk(None), b"data: [DONE]"])
    _, relay = relay_all(upstream)
    assert relay.result.first_token_at is None


def test_usage_chunk_is_dropped_unless_asked_for_but_still_recorded():
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    lines = [chunk("a"), chunk(None, usage=usage, choices=False)]
    upstream = Lines([b"data: " + line for line in lines] + [b"data: [DONE]"])
    events, relay = relay_all(upstream, include_usage=False)
    assert events == [b"data: " + lines[0] + b"\n\n", b"data: [DONE]\n\n"]
    assert relay.result.usage is not None and relay.result.usage["completion_tokens"] == 1


def test_engine_error_event_after_tokens_is_rewritten():
    err = {"error": {"message": "boom", "type": "X", "param": None, "code": 500}}
    upstream = Lines(
        [b"data: " + chunk("a"), b"data: " + json.dumps(err).encode(), b"data: [DONE]"]
    )
    events, relay = relay_all(upstream)
    rewritten = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert rewritten == {
        "message": "boom",
        "type": "server_error",
        "param": None,
        "code": "engine_error_500",
    }
    assert relay.result.outcome == "engine_error"


def test_failure_mid_stream_is_an_error_event_then_done_and_no_drain():
    upstream = Lines([b"data: " + chunk("a")], fail=EngineTimeout("read timeout"))
    events, relay = relay_all(upstream)
    assert json.loads(events[1].removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"
    assert events[-1] == b"data: [DONE]\n\n"
    assert relay.result.outcome == "upstream_timeout"
    assert upstream.drained is False


def test_a_burst_is_relayed_as_one_write_and_done_ends_it():
    tokens = [chunk("a"), chunk("b"), chunk("c")]
    after_done = b"data: " + chunk("never")
    lines = [b"data: " + t for t in tokens] + [b"data: [DONE]", after_done]
    events, relay = relay_all(Lines(lines, one_read=True))
    assert events == [b"".join(b"data: " + t + b"\n\n" for t in tokens), b"data: [DONE]\n\n"]
    assert relay.result.outcome == "success"


def test_a_usage_object_is_found_even_beside_a_nested_null_usage():
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    final = json.dumps(
        {"choices": [], "usage": usage, "extra": {"usage": None}}, separators=(",", ":")
    ).encode()
    upstream = Lines([b"data: " + chunk("a"), b"data: " + final, b"data: [DONE]"])
    events, relay = relay_all(upstream, include_usage=False)
    assert events == [b"data: " + chunk("a") + b"\n\n", b"data: [DONE]\n\n"]
    assert relay.result.kv is not None and relay.result.usage is not None
