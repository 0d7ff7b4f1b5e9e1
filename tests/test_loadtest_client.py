"""The load generator's client and loops against a tiny fake OpenAI SSE server.

The fake server is used here because the client is the thing under test: its SSE parsing,
per-chunk timing, error handling, Retry-After back-off, concurrency and time bounds need
a server whose timings and failures are known exactly. The real gateway and engine are
driven in tests/test_loadtest_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtest import LoadConfig, PolicyChoice, run_load
from loadtest.schedule import poisson_arrivals
from tests.support.gateway_server import serve_app

FIRST_TOKEN_S = 0.15
GAP_S = 0.05
TOKENS = 5
# Slack for a client starved of CPU for seconds by other work on a shared machine.
STARVED_S = 5.0
KV = {"policy": "raas", "peak_retained_tokens": 32, "dense_equivalent_tokens": 80}


class Fake:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()


def chunk(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def fake_app(fake: Fake) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        body = await request.json()
        fake.bodies.append(body)
        fake.headers.append(dict(request.headers))
        behaviour = body["messages"][0]["content"]
        if behaviour == "refuse":
            error = {"message": "busy", "type": "rate_limit_error", "param": None}
            return JSONResponse(
                {"error": {**error, "code": "queue_full"}},
                status_code=429,
                headers={"Retry-After": "1"},
            )

        async def events() -> AsyncIterator[bytes]:
            with fake.lock:
                fake.active += 1
                fake.max_active = max(fake.max_active, fake.active)
            try:
                # The role-only first chunk carries no content: it must not count as TTFT.
                yield chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                await asyncio.sleep(FIRST_TOKEN_S)
                for i in range(TOKENS):
                    if i:
                        await asyncio.sleep(GAP_S)
                    yield delta_chunk(f"t{i}")
                    if behaviour == "stall":
                        await asyncio.sleep(60)
                    if behaviour == "cut" and i == 1:
                        return
                if behaviour == "error":
                    yield chunk(
                        {
                            "error": {
                                "message": "slow",
                                "type": "server_error",
                                "param": None,
                                "code": "upstream_timeout",
                            }
                        }
                    )
                else:
                    usage = {"prompt_tokens": 7, "completion_tokens": TOKENS, "kv_cache": KV}
                    yield chunk({"choices": [], "usage": usage})
                yield b"data: [DONE]\n\n"
            finally:
                with fake.lock:
                    fake.active -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def delta_chunk(text: str) -> bytes:
    return chunk({"choices": [{"index": 0, "delta": {"content": text}}]})


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[Fake, str]]:
    state = Fake()
    with serve_app(fake_app(state)) as url:
        yield state, url


def prompts(tmp_path: Path, *behaviours: str) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(list(behaviours)))
    return str(path)


def run(url: str, tmp_path: Path, behaviour: str, **overrides: Any):
    config = LoadConfig(
        base_url=url, model="fake", prompt_set=prompts(tmp_path, behaviour), **overrides
    )
    return asyncio.run(run_load(config))


def test_stream_timing_usage_and_request_body(fake, tmp_path):
    state, url = fake
    start = len(state.bodies)
    policies = [PolicyChoice.parse("raas,budget_tokens=64"), PolicyChoice.parse("default")]
    result = run(
        url,
        tmp_path,
        "ok",
        num_requests=4,
        concurrency=1,
        policies=policies,
        api_key="sk-test",
        max_tokens=9,
    )
    assert [r.outcome for r in result.records] == ["ok"] * 4
    for r in result.records:
        # Upper bounds leave room for a CPU-starved client (CI machines are shared); they
        # still catch a clock taken from the wrong event (e.g. ITL from the request start).
        assert FIRST_TOKEN_S <= r.ttft_s < FIRST_TOKEN_S + STARVED_S
        assert len(r.itl_s) == TOKENS - 1
        assert all(GAP_S * 0.8 <= gap < GAP_S + STARVED_S for gap in r.itl_s)
        assert sum(r.itl_s) >= (TOKENS - 1) * GAP_S * 0.8
        assert r.latency_s >= r.ttft_s + sum(r.itl_s)
        assert (r.prompt_tokens, r.completion_tokens, r.kv_cache) == (7, TOKENS, KV)
    bodies = state.bodies[start:]
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert all(b["max_tokens"] == 9 for b in bodies)
    sent_policies = [b.get("kv_policy") for b in bodies]
    labels = [r.policy for r in result.records]
    assert sent_policies == [
        {"name": "raas", "budget_tokens": 64} if lab == "raas/64" else None for lab in labels
    ]
    assert all(h["authorization"] == "Bearer sk-test" for h in state.headers[start:])


def test_closed_loop_keeps_exactly_the_configured_concurrency(fake, tmp_path):
    state, url = fake
    state.max_active = 0
    result = run(url, tmp_path, "ok", num_requests=9, concurrency=3)
    assert len(result.records) == 9 and all(r.success for r in result.records)
    assert state.max_active == 3
    # Three waves of three, not nine one at a time (with room for a starved client).
    one = FIRST_TOKEN_S + (TOKENS - 1) * GAP_S
    assert 3 * one <= result.duration_s < 6 * one + STARVED_S


def test_429_is_recorded_with_its_code_and_retry_after_is_honoured(fake, tmp_path):
    _, url = fake
    result = run(url, tmp_path, "refuse", num_requests=2, concurrency=1)
    assert [r.outcome for r in result.records] == ["429", "429"]
    assert {r.error_code for r in result.records} == {"queue_full"}
    assert result.records[0].retry_after_s == 1.0
    # The second request waited out the first one's Retry-After (1 s).
    first, second = sorted(result.records, key=lambda r: r.start_s)
    assert second.start_s - first.end_s >= 0.99
    eager = run(url, tmp_path, "refuse", num_requests=20, concurrency=1, honor_retry_after=False)
    assert len(eager.records) == 20


@pytest.mark.parametrize(
    ("behaviour", "outcome", "code"),
    [("error", "stream_error", "upstream_timeout"), ("cut", "no_done", "no_done")],
)
def test_stream_errors_and_missing_done_are_failures(fake, tmp_path, behaviour, outcome, code):
    _, url = fake
    (r,) = run(url, tmp_path, behaviour, num_requests=1).records
    assert (r.status, r.outcome, r.error_code, r.success) == (200, outcome, code, False)
    assert r.saw_done == (behaviour == "error")


def test_duration_bound_cancels_requests_after_the_drain_timeout(fake, tmp_path):
    _, url = fake
    result = run(
        url,
        tmp_path,
        "stall",
        num_requests=100,
        concurrency=4,
        duration_s=0.5,
        drain_timeout_s=0.5,
    )
    # Well short of the 60 s stall: the duration bound cancelled the requests.
    assert 0.9 <= result.duration_s < 2.5 + STARVED_S
    assert len(result.records) == 4
    assert {r.outcome for r in result.records} == {"cancelled"}


def test_open_loop_sends_at_the_seeded_poisson_times(fake, tmp_path):
    _, url = fake
    result = run(
        url, tmp_path, "ok", mode="open", request_rate=10.0, num_requests=8, concurrency=100, seed=3
    )
    expected = poisson_arrivals(10.0, 8, 3)
    starts = sorted(r.start_s for r in result.records)
    assert all(r.success for r in result.records)
    # Never early; late only by what a starved client's event loop adds.
    assert all(e - 0.01 <= s < e + STARVED_S for s, e in zip(starts, expected, strict=True))
