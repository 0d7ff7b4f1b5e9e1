"""The stream relay's chunk handling, fed SGLang's exact serialization (pydantic's
compact `model_dump_json`, `"usage":null` on token chunks). The relay over real sockets
is in test_gateway_contract.py; here the upstream is a list of lines, so that what is
passed through untouched and what is rewritten can be checked byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from service.chat.kv_policy import EffectivePolicy, KvCacheUsage
from service.chat.stream_relay import RelayResponse, StreamRelay
from service.engine.client import EngineTimeout

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
    assert len(events) == 2 and events[-1].endswith(b"\n\ndata: [DONE]\n\n")
    error = events[-1].removesuffix(b"data: [DONE]\n\n").removeprefix(b"data: ")
    assert json.loads(error)["error"]["code"] == "upstream_timeout"
    assert relay.result.outcome == "upstream_timeout"
    assert upstream.drained is False


def test_a_burst_and_its_done_are_relayed_as_one_write_and_done_ends_it():
    tokens = [chunk("a"), chunk("b"), chunk("c")]
    after_done = b"data: " + chunk("never")
    lines = [b"data: " + t for t in tokens] + [b"data: [DONE]", after_done]
    events, relay = relay_all(Lines(lines, one_read=True))
    assert events == [b"".join(b"data: " + t + b"\n\n" for t in tokens) + b"data: [DONE]\n\n"]
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


# --- RelayResponse: the ASGI exchange around the relay --------------------------------


class Silent(Lines):
    """Sends its lines, then goes quiet (an engine still prefilling or stalled)."""

    async def line_batches(self) -> AsyncIterator[list[bytes]]:
        for line in self._lines:
            yield [line]
        await asyncio.Event().wait()
        yield []  # pragma: no cover - never reached


class Exchange:
    """One ASGI request's side of the server: what was sent, and a client that hangs up
    when told to."""

    def __init__(self, send_fails: bool = False) -> None:
        self.sent: list[dict] = []
        self.hang_up = asyncio.Event()
        self.send_fails = send_fails

    async def receive(self) -> dict:
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self.send_fails and message["type"] == "http.response.body":
            raise OSError("client connection lost")
        self.sent.append(message)


async def until(predicate, timeout_s: float = 5.0) -> None:
    """Poll `predicate` on every loop iteration until it holds, or fail at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def streaming(exchange: Exchange) -> bool:
    """The head and the first event are out: the relay now waits on the engine."""
    return len(exchange.sent) >= 2


def response_for(
    upstream: Lines,
    on_finish_gate: asyncio.Event | None = None,
    finishing: asyncio.Event | None = None,
):
    finishes: list[tuple[bool, str]] = []

    async def on_finish(relay: StreamRelay, disconnected: bool) -> None:
        if finishing is not None:
            finishing.set()
        if on_finish_gate is not None:
            await on_finish_gate.wait()  # a clean-up that takes a while
        finishes.append((disconnected, relay.result.outcome))

    relay = StreamRelay(upstream, POLICY, include_usage=True, on_finish=on_finish)
    return RelayResponse(relay), finishes


def test_response_relays_the_stream_and_finishes_once():
    upstream = Lines([b"data: " + chunk("Hi"), b"data: [DONE]"])
    response, finishes = response_for(upstream)
    exchange = Exchange()
    asyncio.run(response({"type": "http"}, exchange.receive, exchange.send))
    assert exchange.sent[0]["type"] == "http.response.start"
    assert exchange.sent[1]["more_body"] is True
    # The last event ends the response in the same message: no empty write after it.
    assert exchange.sent[2:] == [
        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
    ]
    assert finishes == [(False, "success")]
    assert upstream.drained is True


def test_client_hanging_up_on_a_silent_engine_ends_the_response_at_once():
    upstream = Silent([b"data: " + chunk("Hi")])
    response, finishes = response_for(upstream)

    async def run() -> None:
        exchange = Exchange()
        task = asyncio.ensure_future(response({"type": "http"}, exchange.receive, exchange.send))
        await until(lambda: streaming(exchange))
        assert not task.done()
        exchange.hang_up.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert finishes == [(True, "client_disconnected")]
    assert upstream.drained is False


def test_after_a_hang_up_the_request_task_runs_on_uncancelled():
    """The client leaving cancels the relay's own scope, not the request's task: what
    wraps the response (the metrics middleware, the server's own bookkeeping) can still
    await."""
    upstream = Silent([b"data: " + chunk("Hi")])
    response, finishes = response_for(upstream)

    async def request_task(exchange: Exchange) -> int:
        await response({"type": "http"}, exchange.receive, exchange.send)
        await asyncio.sleep(0)  # would raise CancelledError if one were left pending
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    async def run() -> int:
        exchange = Exchange()
        task = asyncio.ensure_future(request_task(exchange))
        await until(lambda: streaming(exchange))
        exchange.hang_up.set()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(run()) == 0
    assert finishes == [(True, "client_disconnected")]


def test_a_failed_write_to_the_client_counts_as_a_disconnect():
    upstream = Silent([b"data: " + chunk("Hi")])
    response, finishes = response_for(upstream)
    exchange = Exchange(send_fails=True)
    asyncio.run(asyncio.wait_for(response({"type": "http"}, exchange.receive, exchange.send), 5))
    assert finishes == [(True, "client_disconnected")]


def test_a_cancelled_request_still_finishes_once_even_when_cancelled_again_meanwhile():
    """Server shutdown cancels the request's task: the clean-up (which releases the
    admission slot) must run to its end, once, and the cancellation must still reach
    the caller."""
    upstream = Silent([b"data: " + chunk("Hi")])
    gate, finishing = asyncio.Event(), asyncio.Event()
    response, finishes = response_for(upstream, on_finish_gate=gate, finishing=finishing)

    async def run() -> None:
        exchange = Exchange()
        task = asyncio.ensure_future(response({"type": "http"}, exchange.receive, exchange.send))
        await until(lambda: streaming(exchange))
        task.cancel()
        await asyncio.wait_for(finishing.wait(), 5)
        task.cancel()  # again, while the clean-up waits
        for _ in range(10):  # loop iterations in which a lost clean-up would end the task
            await asyncio.sleep(0)
        assert not task.done() and finishes == []
        gate.set()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancellation was swallowed")

    asyncio.run(run())
    assert len(finishes) == 1


def test_a_cancelled_request_whose_clean_up_fails_still_ends_cancelled():
    """Shutdown must not turn into an unrelated exception: the clean-up's failure is
    logged, the cancellation is what the caller sees."""
    upstream = Silent([b"data: " + chunk("Hi")])

    async def on_finish(relay: StreamRelay, disconnected: bool) -> None:
        raise RuntimeError("clean-up bug")

    relay = StreamRelay(upstream, POLICY, include_usage=True, on_finish=on_finish)
    response = RelayResponse(relay)

    async def run() -> None:
        exchange = Exchange()
        task = asyncio.ensure_future(response({"type": "http"}, exchange.receive, exchange.send))
        await until(lambda: streaming(exchange))
        task.cancel()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            return
        raise AssertionError("the cancellation was lost")

    asyncio.run(run())
