"""The gateway's HTTP contract, driven by the real `openai` client over real sockets,
against a scripted stand-in for SGLang.

The stand-in speaks SGLang's wire format and can do what a healthy engine on this
machine will not do on demand: report `usage.kv_cache`, stall, fail mid-stream, send an
error event. Tests against the real engine are in test_gateway_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.app import create_app
from service.engine.client import EngineClient, Health
from service.server.drain import DrainingServer
from service.server.settings import Settings
from tests.support.gateway_server import serve_app, wait_ready
from tests.support.metrics_text import gateway_metric
from tests.support.sglang_server import free_port

MODEL = "smollm2-135m-instruct"
ENGINE_KV = {"peak_retained_tokens": 48, "dense_equivalent_tokens": 96, "evicted_pages": 3}
ENGINE_METRICS = """\
# HELP sglang:num_running_reqs running
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{tp_rank="0"} 0.0
# HELP sglang:kv_used_tokens used
# TYPE sglang:kv_used_tokens gauge
sglang:kv_used_tokens{tp_rank="0"} 64.0
"""


HOLD_LIMIT_S = 60


class FakeEngine:
    """Scripted by the last user message: `hold:<gate>`, `drip:<s>`,
    `die-mid-stream`, `truncate`, `stall-mid-stream`, `linger`, `error-event`,
    `bad-request`, `report-kv`.

    `hold:<gate>` answers only once the test opens that gate (`held(...)`): a request kept
    in flight for as long as the test needs, however slowly a loaded machine runs it
    (`stall-mid-stream` waits on the gate `stall`)."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.bodies: list[dict[str, Any]] = []
        self.aborts: list[str] = []
        # The gateway's connection (its client port) each chat request came in on.
        self.chat_ports: list[int] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/abort_request")(self.abort)
        # The supervisor's two probes: SGLang's HTTP front end, then its scheduler.
        self.app.get("/model_info")(lambda: JSONResponse({"model_path": MODEL}))
        self.app.get("/health_generate")(lambda: PlainTextResponse("ok"))
        self.app.get("/metrics")(lambda: PlainTextResponse(ENGINE_METRICS))

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    async def hold(self, name: str) -> None:
        gate = self.gate(name)
        deadline = time.monotonic() + HOLD_LIMIT_S  # never hang the suite
        while not gate.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def abort(self, request: Request) -> JSONResponse:
        self.aborts.append((await request.json())["rid"])
        return JSONResponse({})

    async def chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        self.chat_ports.append(request.client.port if request.client else -1)
        script = body["messages"][-1]["content"]
        if script == "bad-request":
            return JSONResponse(
                {
                    "object": "error",
                    "message": "kv_policy.recent_tokens: expected at most 48, got 64",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
                status_code=400,
            )
        if script.startswith("hold:"):
            await self.hold(script.split(":", 1)[1])
        usage: dict[str, Any] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if script == "report-kv":
            usage["kv_cache"] = {"policy": body["custom_params"]["kv_policy"]["name"], **ENGINE_KV}
        if not body.get("stream"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "a b c",
                    "reasoning_content": "thinking",
                },
                "finish_reason": "length",
            }
            if body.get("return_meta_info"):
                # SGLang's per-request timings (with --enable-metrics), in seconds.
                choice["meta_info"] = {
                    "id": body["rid"],
                    "e2e_latency": 0.5,
                    "first_token_latency": 0.2,
                }
            return JSONResponse(
                {
                    "id": body["rid"],
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                }
            )
        return StreamingResponse(self._stream(body, script, usage), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], script: str, usage: dict[str, Any]):
        drip = float(script.split(":")[1]) if script.startswith("drip:") else 0.0
        n_tokens = 200 if drip else 3

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            payload = {
                "id": body["rid"],
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(payload)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for i in range(n_tokens):
            if drip:
                await asyncio.sleep(drip)
            yield chunk({"content": f"t{i} "})
            if script == "die-mid-stream" and i == 1:
                raise RuntimeError("engine died")  # the connection breaks mid-body
            if script == "truncate" and i == 1:
                return  # a clean end of body, but no [DONE]
            if script == "stall-mid-stream" and i == 1:
                await self.hold("stall")  # alive but silent past the gateway's read timeout
            if script == "error-event" and i == 1:
                err = {
                    "object": "error",
                    "message": "boom",
                    "type": "X",
                    "param": None,
                    "code": 500,
                }
                yield f"data: {json.dumps({'error': err})}\n\n"
                yield "data: [DONE]\n\n"
                return
        yield chunk({}, "length")
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {
                "id": body["rid"],
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"
        if script == "linger":
            await asyncio.sleep(0.01)  # the body's end arrives in a later read than [DONE]


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[FakeEngine, str]]:
    fake = FakeEngine()
    with serve_app(fake.app) as url:
        yield fake, url


@contextlib.contextmanager
def gateway(engine_url: str, ready: bool = True, **overrides: Any) -> Iterator[str]:
    settings = Settings(
        engine_mode="remote",
        engine_url=engine_url,
        engine_health_interval_s=0.1,
        kv_bytes_per_token=1000,
        **overrides,
    )
    with serve_app(create_app(settings)) as url:
        if ready:
            wait_ready(url, timeout_s=10)
        yield url


def client(url: str, api_key: str = "unused", timeout: float = 30) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429/5xx and hide what we test.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gw(engine) -> Iterator[str]:
    with gateway(engine[1]) as url:
        yield url


# --- the happy paths ------------------------------------------------------------------


def test_chat_forwards_openai_params_and_policy(engine, gw):
    fake, _ = engine
    resp = client(gw).chat.completions.create(
        model=MODEL,
        messages=say("report-kv"),
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        stop=["\n"],
        n=1,
        logprobs=True,
        extra_body={"kv_policy": {"name": "raas", "budget_tokens": 256, "alpha": 1e-4}},
    )
    sent = fake.bodies[-1]
    for field, value in {
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n"],
        "n": 1,
        "logprobs": True,
    }.items():
        assert sent[field] == value, field
    assert sent["custom_params"] == {
        "kv_policy": {"name": "raas", "budget_tokens": 256, "alpha": 1e-4}
    }
    assert sent["rid"] == resp.id and resp.id.startswith("chatcmpl-")
    assert "kv_policy" not in sent
    assert resp.choices[0].message.content == "a b c"
    assert resp.choices[0].message.model_extra["reasoning_content"] == "thinking"
    assert resp.usage.kv_cache == {
        "policy": "raas",
        "budget_tokens": 256,
        "alpha": 1e-4,
        **ENGINE_KV,
    }


def test_kv_cache_is_echoed_even_when_the_engine_reports_nothing(gw):
    resp = client(gw).chat.completions.create(
        model=MODEL, messages=say("hi"), extra_headers={"X-KV-Policy": "name=h2o,budget_tokens=96"}
    )
    assert resp.usage.kv_cache == {
        "policy": "h2o",
        "budget_tokens": 96,
        "alpha": None,  # only raas reads alpha
        "peak_retained_tokens": None,
        "dense_equivalent_tokens": None,
        "evicted_pages": None,
    }


def test_stream_with_usage_gets_kv_cache_in_final_chunk(engine, gw):
    fake, _ = engine
    stream = client(gw).chat.completions.create(
        model=MODEL,
        messages=say("report-kv"),
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"kv_policy": {"name": "streaming", "budget_tokens": 64}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "t0 t1 t2 "
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.kv_cache["policy"] == "streaming"
    assert chunks[-1].usage.kv_cache["peak_retained_tokens"] == 48
    assert fake.bodies[-1]["stream_options"] == {"include_usage": True}


def sse_payloads(url: str, script: str) -> list[str]:
    """A raw stream's `data:` payloads (the openai client hides error events)."""
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": say(script), "stream": True},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_finished_streams_hand_their_upstream_connection_back(engine):
    """A relayed stream that ended with [DONE] must leave its connection reusable: a new
    connection per stream costs a TCP handshake on every request."""
    fake, engine_url = engine
    # A fresh gateway: its pool holds nothing from other tests' aborted streams.
    with gateway(engine_url) as url:
        first = len(fake.chat_ports)
        for _ in range(6):
            assert sse_payloads(url, "linger")[-1] == "[DONE]"
        # Without the hand-back: 6. A health probe may hold the pooled connection as a
        # stream starts, and on a loaded machine a drain may time out (0.2 s): a few.
        ports = fake.chat_ports[first:]
        assert len(set(ports)) < 6, ports


def test_stream_without_usage_hides_the_usage_chunk_and_ends_with_done(gw):
    events = sse_payloads(gw, "hi")
    assert events[-1] == "[DONE]"
    assert all('"usage"' not in e for e in events)


def test_models_and_health(gw):
    models = client(gw).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{gw}/health/live").json() == {"status": "alive"}
    ready = httpx.get(f"{gw}/health/ready").json()
    assert ready["status"] == "ready" and ready["engine_mode"] == "remote"


# --- errors -----------------------------------------------------------------------------


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_invalid_kv_policy_is_400_naming_the_field(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(
            model=MODEL,
            messages=say("hi"),
            extra_body={"kv_policy": {"name": "raas", "budget_tokens": 10**9}},
        )
    assert exc.value.body["param"] == "kv_policy.budget_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(
            model=MODEL, messages=say("hi"), extra_headers={"X-KV-Policy": "name=lru"}
        )
    assert exc.value.body["param"] == "kv_policy.name"


def test_max_tokens_limit_is_400(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model=MODEL, messages=say("hi"), max_tokens=10**6)
    assert exc.value.body["param"] == "max_tokens"


def test_engine_400_passes_through_with_param(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model=MODEL, messages=say("bad-request"))
    assert exc.value.body["param"] == "kv_policy.recent_tokens"


def test_unknown_model_is_404(gw):
    with pytest.raises(openai.NotFoundError) as exc:
        client(gw).chat.completions.create(model="gpt-4o", messages=say("hi"))
    assert exc.value.body["code"] == "model_not_found"
    err = error_of(httpx.get(f"{gw}/v1/nothing-here"))
    assert err["code"] == "not_found"
    resp = httpx.get(f"{gw}/v1/chat/completions")
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"


def test_malformed_json_and_schema_are_422(gw):
    resp = httpx.post(
        f"{gw}/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422 and error_of(resp)["code"] == "invalid_json"
    resp = httpx.post(f"{gw}/v1/chat/completions", json={"model": MODEL})
    assert resp.status_code == 422 and error_of(resp)["param"] == "messages"
    with pytest.raises(openai.UnprocessableEntityError):
        client(gw).chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]


def test_deeply_nested_json_is_422_not_500(gw):
    resp = httpx.post(
        f"{gw}/v1/chat/completions",
        content=b"[" * 100_000,  # far under the size limit, far over the parser's depth
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422 and error_of(resp)["code"] == "invalid_json"


def http_requests(url: str, code: str) -> float:
    """raas_http_requests_total for the chat route and `code` (0 when absent)."""
    return gateway_metric(
        url, "raas_http_requests_total", code=code, method="POST", route="/v1/chat/completions"
    )


def test_a_bug_in_the_chat_path_is_a_500_in_openai_shape_and_the_gateway_serves_on(engine):
    """An unexpected exception on the chat route must reach the server-error handler, as
    OpenAI's 500 with nothing of the exception in it, and be counted under the chat
    route."""
    settings = Settings(
        engine_mode="remote",
        engine_url=engine[1],
        engine_health_interval_s=0.1,
        kv_bytes_per_token=1000,
    )
    app = create_app(settings)
    with serve_app(app) as url:
        wait_ready(url, timeout_s=10)
        service = app.state.chat_service
        working = service.complete

        async def broken(*_: Any) -> None:
            raise RuntimeError("secret-internal-detail")

        before = http_requests(url, "500")
        service.complete = broken
        try:
            resp = httpx.post(
                f"{url}/v1/chat/completions", json={"model": MODEL, "messages": say("x")}
            )
        finally:
            service.complete = working
        assert resp.status_code == 500
        err = error_of(resp)
        assert (err["type"], err["code"]) == ("server_error", "internal_error")
        assert "secret" not in resp.text and "Traceback" not in resp.text
        assert http_requests(url, "500") == before + 1
        assert client(url).chat.completions.create(model=MODEL, messages=say("hi")).choices


def test_client_hanging_up_mid_upload_is_499_not_a_server_error(engine):
    with gateway(engine[1]) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                b'{"model": "'
            )
            time.sleep(0.3)  # the route is reading the body when the client goes
        wait_for(lambda: http_requests(url, "499") == 1, timeout_s=10)
        assert http_requests(url, "500") == 0


def test_body_too_large_is_413(engine):
    with gateway(engine[1], max_request_bytes=2048) as url:
        big = "x" * 4096
        resp = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": say(big)})
        assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"

        def chunked():
            yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", '
            yield b'"content": "' + b"y" * 4096 + b'"}]}'

        resp = httpx.post(f"{url}/v1/chat/completions", content=chunked())
        assert resp.status_code == 413


def test_auth(engine, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-good", "name": "tester"}]}))
    with gateway(engine[1], api_keys_file=keys, api_keys="sk-env") as url:
        for bad in ("sk-bad", ""):
            with pytest.raises(openai.AuthenticationError) as exc:
                client(url, api_key=bad).models.list()
            assert exc.value.body["code"] == "invalid_api_key"
        resp = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        for good in ("sk-good", "sk-env"):
            out = client(url, api_key=good).chat.completions.create(model=MODEL, messages=say("x"))
            assert out.choices[0].message.content == "a b c"
        assert httpx.get(f"{url}/health/ready").status_code == 200  # probes need no key


def test_key_budget_cap_applies(engine, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-small max_budget_tokens=128 default_policy=streaming\n")
    with gateway(engine[1], api_keys_file=keys) as url:
        c = client(url, api_key="sk-small")
        out = c.chat.completions.create(model=MODEL, messages=say("x"))
        assert out.usage.kv_cache["policy"] == "streaming"
        assert out.usage.kv_cache["budget_tokens"] == 128
        with pytest.raises(openai.BadRequestError, match="API key cap"):
            c.chat.completions.create(
                model=MODEL, messages=say("x"), extra_body={"kv_policy": {"budget_tokens": 256}}
            )


def test_probe_tells_a_busy_pool_from_a_dead_engine(engine):
    """Waiting for a pooled connection (all held by streams) is a slow engine, not a dead
    one: a DOWN here would make the embedded supervisor restart a healthy engine."""
    _, engine_url = engine

    async def scenario() -> tuple[Health, Health, Health]:
        client = EngineClient(engine_url, connect_timeout_s=1, read_timeout_s=30, max_connections=1)
        try:
            idle = await client.probe(10.0)  # an idle engine answers, however loaded
            body = {"model": MODEL, "messages": say("drip:0.05"), "stream": True}
            stream = await client.open_stream(body)
            try:
                busy = await client.probe(0.3)
            finally:
                await stream.aclose()
        finally:
            await client.aclose()
        dead = EngineClient(
            f"http://127.0.0.1:{free_port()}",
            connect_timeout_s=1,
            read_timeout_s=30,
            max_connections=1,
        )
        try:
            down = await dead.probe(0.3)
        finally:
            await dead.aclose()
        return idle, busy, down

    assert asyncio.run(scenario()) == (Health.OK, Health.SLOW, Health.DOWN)


def test_engine_down_is_503_and_not_ready():
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(dead, ready=False) as url:
        # Once the first probe has found the engine gone.
        wait_for(lambda: "raas_engine_up 0.0" in httpx.get(f"{url}/metrics").text)
        assert httpx.get(f"{url}/health/ready").status_code == 503
        assert httpx.get(f"{url}/health/live").status_code == 200
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(model=MODEL, messages=say("hi"))
        assert exc.value.status_code == 503
        assert exc.value.body["code"] == "engine_unavailable"
        metrics = httpx.get(f"{url}/metrics").text
        assert "raas_engine_up 0.0" in metrics and "raas_engine_ready 0.0" in metrics


def test_upstream_timeout_is_504_and_aborts(engine):
    fake, engine_url = engine
    with gateway(engine_url, upstream_timeout_s=0.5) as url, held(fake, "timeout") as hold:
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(model=MODEL, messages=hold.messages)
        assert exc.value.status_code == 504
        assert exc.value.body["code"] == "upstream_timeout"
        rid = fake.bodies[-1]["rid"]
        wait_for(lambda: rid in fake.aborts)


def test_mid_stream_failure_is_an_error_event_then_done(gw):
    for script, code in (
        ("die-mid-stream", "engine_unavailable"),
        ("truncate", "engine_unavailable"),
        ("error-event", None),
    ):
        events = sse_payloads(gw, script)
        assert events[-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e]
        assert len(errors) == 1 and set(errors[0]) == {"message", "type", "param", "code"}
        if code:
            assert errors[0]["code"] == code
        else:
            assert errors[0]["message"] == "boom" and errors[0]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="closed the stream before it finished"):
        list(client(gw).chat.completions.create(model=MODEL, messages=say("truncate"), stream=True))


def test_stream_stalled_mid_body_is_a_timeout_event_and_aborts(engine):
    fake, engine_url = engine
    with gateway(engine_url, upstream_timeout_s=0.5) as url, held(fake, "stall"):
        events = sse_payloads(url, "stall-mid-stream")
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "upstream_timeout"
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[1:-2]] == [
            "t0 ",
            "t1 ",
        ]
        rid = fake.bodies[-1]["rid"]
        wait_for(lambda: rid in fake.aborts)


# --- admission --------------------------------------------------------------------------


@dataclass
class Hold:
    """`messages` make a request the fake engine holds until `release()` (or the end of
    the `held` block, whichever comes first)."""

    messages: list[dict[str, str]]
    release: Callable[[], None]


@contextlib.contextmanager
def held(fake: FakeEngine, name: str) -> Iterator[Hold]:
    gate = fake.gate(name)
    gate.clear()
    try:
        yield Hold(say(f"hold:{name}"), gate.set)
    finally:
        gate.set()


def background(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_queue_full_is_429_with_retry_after(engine):
    fake, engine_url = engine
    with (
        gateway(engine_url, max_in_flight=1, max_queue=1, retry_after_s=2) as url,
        held(fake, "queue_full") as hold,
    ):
        c = client(url)
        results: list[str] = []
        holder = background(
            lambda: results.append(
                c.chat.completions.create(model=MODEL, messages=hold.messages).id
            )
        )
        wait_for(lambda: gauge(url, "raas_requests_in_flight") == 1)
        queued = background(
            lambda: results.append(c.chat.completions.create(model=MODEL, messages=say("x")).id)
        )
        wait_for(lambda: gauge(url, "raas_requests_queued") == 1)
        with pytest.raises(openai.RateLimitError) as exc:
            c.chat.completions.create(model=MODEL, messages=say("x"))
        assert exc.value.response.headers["retry-after"] == "2"
        assert exc.value.body["code"] == "queue_full"
        hold.release()
        holder.join(20)
        queued.join(20)
        assert len(results) == 2  # the queued request was served once the slot freed
        assert (
            'raas_admission_rejections_total{reason="queue_full"} 1.0'
            in httpx.get(f"{url}/metrics").text
        )


def test_per_key_concurrency_is_429(engine, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": "sk-one", "max_concurrency": 1}, {"key": "sk-two"}]))
    fake, engine_url = engine
    with gateway(engine_url, api_keys_file=keys) as url, held(fake, "per_key") as hold:
        holder = background(
            lambda: client(url, "sk-one").chat.completions.create(
                model=MODEL, messages=hold.messages
            )
        )
        wait_for(lambda: gauge(url, "raas_requests_in_flight") == 1)
        with pytest.raises(openai.RateLimitError) as exc:
            client(url, "sk-one").chat.completions.create(model=MODEL, messages=say("x"))
        assert exc.value.body["code"] == "key_concurrency"
        client(url, "sk-two").chat.completions.create(model=MODEL, messages=say("x"))
        hold.release()
        holder.join(20)


# --- disconnects ------------------------------------------------------------------------


def test_stream_disconnect_aborts_in_engine(engine, gw):
    fake, _ = engine
    stream = client(gw).chat.completions.create(model=MODEL, messages=say("drip:0.05"), stream=True)
    next(iter(stream))
    rid = fake.bodies[-1]["rid"]
    stream.close()
    wait_for(lambda: rid in fake.aborts, timeout_s=5)
    wait_for(lambda: gauge(gw, "raas_requests_in_flight") == 0, timeout_s=5)


def test_non_stream_disconnect_aborts_in_engine(engine, gw):
    fake, _ = engine
    with held(fake, "non_stream_disconnect") as hold, pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw}/v1/chat/completions",
            json={"model": MODEL, "messages": hold.messages},
            timeout=httpx.Timeout(5, read=0.5),
        )
    rid = fake.bodies[-1]["rid"]
    wait_for(lambda: rid in fake.aborts, timeout_s=5)
    wait_for(lambda: gauge(gw, "raas_requests_in_flight") == 0, timeout_s=5)


# --- metrics ----------------------------------------------------------------------------


def test_metrics_after_traffic(gw):
    c = client(gw)
    whole = httpx.post(
        f"{gw}/v1/chat/completions",
        json={"model": MODEL, "messages": say("report-kv"), "kv_policy": {"name": "quest"}},
    ).json()
    # The engine's timings feed the metrics; the client gets an OpenAI choice without them.
    assert "meta_info" not in whole["choices"][0]
    list(
        c.chat.completions.create(
            model=MODEL,
            messages=say("report-kv"),
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"kv_policy": {"name": "quest"}},
        )
    )
    text = httpx.get(f"{gw}/metrics").text
    for needle in (
        'raas_kv_retained_tokens_total{policy="quest"} 96.0',
        'raas_kv_dense_equivalent_bytes_total{policy="quest"} 192000.0',
        'raas_kv_evicted_pages_total{policy="quest"} 6.0',
        'raas_kv_savings_ratio{policy="quest"} 0.5',
        # The non-streamed request too, from the engine's timings.
        'raas_time_to_first_token_seconds_count{policy="quest"} 2.0',
        'raas_time_per_output_token_seconds_count{policy="quest"} 2.0',
        'raas_completion_tokens_total{policy="quest"} 6.0',
        'raas_http_requests_total{code="200",method="POST",route="/v1/chat/completions"}',
        "raas_engine_kv_used_tokens 64.0",
        "raas_engine_kv_used_bytes 64000.0",
        "raas_engine_up 1.0",
    ):
        assert needle in text, needle
    if shutil.which("promtool"):
        out = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


# --- shutdown and schema ------------------------------------------------------------------


def test_drain_finishes_in_flight_refuses_new_then_stops(engine):
    app = create_app(
        Settings(engine_mode="remote", engine_url=engine[1], engine_health_interval_s=0.1)
    )
    servers: list[DrainingServer] = []

    def make_server(config):
        servers.append(DrainingServer(config, app, timeout_s=30))
        return servers[-1]

    fake = engine[0]
    with serve_app(app, make_server=make_server) as url, held(fake, "drain") as hold:
        wait_ready(url, timeout_s=10)
        done: list[Any] = []
        slow = background(
            lambda: done.append(
                client(url).chat.completions.create(model=MODEL, messages=hold.messages)
            )
        )
        wait_for(lambda: gauge(url, "raas_requests_in_flight") == 1)
        servers[0].handle_exit(signal.SIGTERM, None)  # what uvicorn calls on the signal
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(model=MODEL, messages=say("hi"))
        assert exc.value.status_code == 503 and exc.value.body["code"] == "shutting_down"
        assert not servers[0].should_exit
        hold.release()
        slow.join(10)
        assert done and done[0].choices[0].message.content == "a b c"
        wait_for(lambda: servers[0].should_exit, 5)


def test_a_drain_that_runs_out_cuts_streams_with_an_error_event_and_done(engine):
    """A stream still open when the drain times out ends as a complete response with
    the `shutting_down` error event and `[DONE]`, is aborted in the engine, and the
    server then stops; uvicorn's shutdown would cancel it mid-chunk instead."""
    fake, engine_url = engine
    app = create_app(
        Settings(engine_mode="remote", engine_url=engine_url, engine_health_interval_s=0.1)
    )
    servers: list[DrainingServer] = []

    def make_server(config):
        servers.append(DrainingServer(config, app, timeout_s=0.5))
        return servers[-1]

    with (
        serve_app(app, make_server=make_server) as url,
        held(fake, "stall"),
        httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": say("stall-mid-stream"), "stream": True},
            timeout=30,
        ) as resp,
    ):
        lines = resp.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]
        rid = json.loads(events[0][6:])["id"]
        servers[0].handle_exit(signal.SIGTERM, None)
        events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        wait_for(lambda: rid in fake.aborts)
        wait_for(lambda: servers[0].should_exit, 5)


def test_openapi_references_all_resolve(gw):
    """Schema-driven clients and fuzzers must be able to follow every `$ref`."""
    doc = httpx.get(f"{gw}/openapi.json").json()

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    found = list(refs(doc))
    assert found
    for ref in found:
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            assert isinstance(target, dict) and part in target, f"unresolvable {ref}"
            target = target[part]
    operation = doc["paths"]["/v1/chat/completions"]["post"]
    options = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "include_usage" in json.dumps(options["stream_options"])
    # Every error status the route can answer is documented, in OpenAI's error shape.
    documented = operation["responses"]
    assert set(documented) == {"200", "400", "401", "404", "413", "415", "422", "429", "503", "504"}
    error_schema = documented["429"]["content"]["application/json"]["schema"]["$ref"]
    assert set(doc["components"]["schemas"][error_schema.rsplit("/", 1)[1]]["properties"]) == {
        "error"
    }
    assert [p["name"] for p in operation["parameters"]] == ["authorization"]
