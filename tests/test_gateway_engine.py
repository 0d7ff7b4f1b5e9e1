"""The gateway in front of a real SGLang on the CPU, driven by the openai client.

One engine serves the whole module (a start costs a minute or two on this machine): the
gateway under test is `raas-serve serve` in embedded mode, which starts and supervises
it; tests that need another configuration (tiny admission limits, short timeouts) run an
extra in-process gateway in remote mode against the same engine. The last tests kill the
engine (503, then recovery by the supervisor) and stop the gateway (no orphans).
Generations stay short: the bundled model does ~17 tokens/s here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.app import create_app
from service.server.settings import Settings
from tests.support.embedded_gateway import Served, embedded_gateway
from tests.support.gateway_server import serve_app, wait_ready
from tests.support.metrics_text import gateway_metric
from tests.support.sglang_server import START_TIMEOUT_S, descendants

pytestmark = pytest.mark.engine

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Name three colours."}]
LONG = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def served(bundled_model_path, tmp_path_factory) -> Iterator[Served]:
    with embedded_gateway(bundled_model_path, tmp_path_factory.mktemp("embedded")) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(served) -> str:
    """The embedded engine's own URL, for direct comparisons and its /metrics."""
    return served.engine_url


@pytest.fixture(scope="module")
def gw(served) -> str:
    return served.url


@contextlib.contextmanager
def gateway(engine: str, **overrides: Any) -> Iterator[str]:
    """An extra in-process gateway (remote mode) on the module's engine."""
    settings = Settings(
        engine_mode="remote", engine_url=engine, engine_health_interval_s=0.5, **overrides
    )
    with serve_app(create_app(settings)) as url:
        wait_ready(url, timeout_s=30)
        yield url


def client(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def engine_metric(engine: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{engine}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def assert_kv_cache(
    kv: dict[str, Any],
    policy: str,
    budget: int | None,
    alpha: float | None,
    usage: Any = None,
) -> None:
    """The effective policy, and the numbers the raas engine measured (never null here).

    With `usage` (one choice, no eviction at these lengths): dense-equivalent is every
    position written (the last token's KV never is), all of them still held.
    """
    assert (kv["policy"], kv["budget_tokens"], kv["alpha"]) == (policy, budget, alpha)
    for field in ("peak_retained_tokens", "dense_equivalent_tokens", "evicted_pages"):
        assert isinstance(kv[field], int), (field, kv)
    if usage is not None:
        dense = usage.prompt_tokens + usage.completion_tokens - 1
        assert kv["dense_equivalent_tokens"] == dense, kv
        assert kv["peak_retained_tokens"] == dense and kv["evicted_pages"] == 0, kv


def test_chat_matches_sglang_directly_and_echoes_kv_cache(engine, gw):
    request = {"messages": PROMPT, "max_tokens": 8, "temperature": 0.0}
    direct = httpx.post(
        f"{engine}/v1/chat/completions", json={"model": MODEL, **request}, timeout=120
    ).json()
    resp = client(gw).chat.completions.create(
        model=MODEL,
        **request,
        extra_body={"kv_policy": {"name": "raas", "budget_tokens": 256, "alpha": 1e-4}},
    )
    assert resp.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 0
    assert_kv_cache(resp.usage.kv_cache, "raas", 256, 1e-4, resp.usage)
    assert resp.model == MODEL


def test_a_non_streamed_request_is_timed_by_the_engine(gw):
    """SGLang's per-request timings give a non-streamed request its TTFT and TPOT; its
    meta_info, which the gateway asked for, does not reach the client."""

    def timed() -> tuple[float, float]:
        return (
            gateway_metric(gw, "raas_time_to_first_token_seconds_count", policy="raas"),
            gateway_metric(gw, "raas_time_per_output_token_seconds_count", policy="raas"),
        )

    before = timed()
    resp = httpx.post(
        f"{gw}/v1/chat/completions",
        json={"model": MODEL, "messages": PROMPT, "max_tokens": 4, "temperature": 0.0},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert "meta_info" not in resp.json()["choices"][0]
    wait_for(lambda: timed() == (before[0] + 1, before[1] + 1), 10)


def test_stream_with_usage_and_header_policy(gw):
    stream = client(gw).chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=8,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-KV-Policy": "name=streaming,budget_tokens=128"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 8
    # Only raas reads alpha: streaming echoes none.
    assert_kv_cache(final.usage.kv_cache, "streaming", 128, None, final.usage)


def test_openai_sampling_features_pass_through(gw):
    resp = client(gw).chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        n=2,
        max_completion_tokens=4,
        temperature=0.8,
        top_p=0.9,
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
        extra_body={"kv_policy": {"name": "dense"}},
    )
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.logprobs is not None and len(choice.logprobs.content) >= 1
        assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert_kv_cache(resp.usage.kv_cache, "dense", None, None)


def test_engine_side_policy_validation_is_a_400_naming_the_field(gw):
    # h2o protects its recent window inside the budget; the engine checks that rule.
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=4,
            extra_body={"kv_policy": {"name": "h2o", "budget_tokens": 64, "recent_tokens": 60}},
        )
    assert str(exc.value.body["param"]).startswith("kv_policy")


def test_tools_are_a_clear_400_on_a_model_without_tool_calling(gw):
    """SmolLM2's chat template has no tool-call format and the engine runs no tool-call
    parser: a tool call would come back as text with finish "stop"."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=4, tools=[weather], tool_choice="required"
        )
    assert (exc.value.body["param"], exc.value.body["code"]) == ("tools", "tools_not_supported")


def test_overload_is_429_with_retry_after(engine):
    with gateway(engine, max_in_flight=1, max_queue=0) as url:
        # ignore_eos: the held stream must not end (by EOS) before the second request.
        stream = client(url).chat.completions.create(
            model=MODEL,
            messages=LONG,
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        try:
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as exc:
                client(url).chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
            assert exc.value.response.headers["retry-after"] == "1"
        finally:
            stream.close()


def generation_stopped(engine: str) -> bool:
    before = engine_metric(engine, "sglang:generation_tokens_total")
    time.sleep(0.6)
    return engine_metric(engine, "sglang:generation_tokens_total") == before


def gateway_aborts(gw: str) -> float:
    """The gateway's own abort calls for disconnects (SGLang also aborts by itself when
    the connection closes, so its counter alone would not show the gateway's call)."""
    return gateway_metric(gw, "raas_engine_aborts_total", reason="client_disconnected")


# A 2000-token generation takes minutes here: the 20 s waits below prove that a
# disconnect or a timeout stops it, with room for a client starved of CPU.
ABORT_WAIT_S = 20


def test_stream_disconnect_aborts_in_sglang(engine, gw):
    aborted = engine_metric(engine, "sglang:num_aborted_requests_total")
    ours = gateway_aborts(gw)
    stream = client(gw).chat.completions.create(
        model=MODEL, messages=LONG, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.close()
    wait_for(
        lambda: engine_metric(engine, "sglang:num_aborted_requests_total") > aborted, ABORT_WAIT_S
    )
    wait_for(lambda: engine_metric(engine, "sglang:num_running_reqs") == 0, ABORT_WAIT_S)
    wait_for(lambda: generation_stopped(engine), ABORT_WAIT_S)
    wait_for(lambda: gateway_aborts(gw) == ours + 1, ABORT_WAIT_S)


def test_non_stream_disconnect_aborts_in_sglang(engine, gw):
    aborted = engine_metric(engine, "sglang:num_aborted_requests_total")
    ours = gateway_aborts(gw)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw}/v1/chat/completions",
            json={"model": MODEL, "messages": LONG, "max_tokens": 2000, "ignore_eos": True},
            timeout=httpx.Timeout(10, read=1.5),
        )
    wait_for(
        lambda: engine_metric(engine, "sglang:num_aborted_requests_total") > aborted, ABORT_WAIT_S
    )
    wait_for(lambda: generation_stopped(engine), ABORT_WAIT_S)
    wait_for(lambda: gateway_aborts(gw) == ours + 1, ABORT_WAIT_S)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_disconnect_with_n_2_stops_every_choice(engine, gw, stream):
    """With n > 1 SGLang renames the sub-requests, so the gateway's abort by id misses
    them (docs/api.md); dropping the upstream connection must still stop both choices
    and free their KV, or two long generations would run on for nobody."""
    body = {"model": MODEL, "messages": LONG, "max_tokens": 2000, "n": 2, "ignore_eos": True}
    if stream:
        with httpx.stream(
            "POST", f"{gw}/v1/chat/completions", json={**body, "stream": True}, timeout=60
        ) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            wait_for(lambda: engine_metric(engine, "sglang:num_running_reqs") == 2, ABORT_WAIT_S)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gw}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.5))
    wait_for(lambda: engine_metric(engine, "sglang:num_running_reqs") == 0, ABORT_WAIT_S)
    wait_for(lambda: generation_stopped(engine), ABORT_WAIT_S)


def test_upstream_timeout_is_504_and_frees_the_engine(engine):
    with gateway(engine, upstream_timeout_s=1.0) as url:
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(
                model=MODEL, messages=LONG, max_tokens=2000, extra_body={"ignore_eos": True}
            )
        assert exc.value.status_code == 504
        wait_for(lambda: generation_stopped(engine), ABORT_WAIT_S)


def test_queued_requests_are_served_in_turn(engine):
    with gateway(engine, max_in_flight=1, max_queue=4) as url:
        results: list[int] = []

        def one() -> None:
            resp = client(url).chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=4, extra_body={"ignore_eos": True}
            )
            results.append(resp.usage.completion_tokens)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [4, 4, 4]
        text = httpx.get(f"{url}/metrics").text
        assert "raas_queue_wait_seconds_count 3.0" in text


def test_metrics_reexport_the_engine_and_pass_promtool(gw):
    # The engine's part of a scrape waits up to 2 s for the engine's own /metrics; on a
    # loaded machine one scrape may go without it, the next one has it.
    texts: list[str] = []

    def engine_part_in() -> bool:
        texts.append(httpx.get(f"{gw}/metrics").text)
        return "raas_engine_up 1.0" in texts[-1]

    wait_for(engine_part_in, 30)
    text = texts[-1]
    for needle in (
        "raas_engine_up 1.0",
        "raas_engine_ready 1.0",
        "raas_engine_kv_capacity_tokens 16384.0",
        "raas_engine_running_requests",
        "raas_engine_kv_used_bytes",
        "raas_kv_bytes_per_token 46080.0",
        'raas_kv_requests_total{policy="raas"}',
        "raas_e2e_request_latency_seconds_bucket",
    ):
        assert needle in text, needle
    if shutil.which("promtool"):
        out = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def chat(url: str) -> str:
    resp = client(url).chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4)
    return resp.choices[0].message.content or ""


def test_readiness_reports_the_embedded_engine(served):
    ready = httpx.get(f"{served.url}/health/ready").json()
    assert ready == {
        "status": "ready",
        "engine_mode": "embedded",
        "engine_state": "ready",
        "engine_restarts": 0,
    }


def test_engine_crash_gives_503_then_the_supervisor_recovers(served):
    os.killpg(served.engine_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{served.url}/health/ready").status_code != 503:
        assert time.monotonic() < deadline, "readiness never dropped after the engine died"
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as exc:
        chat(served.url)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "engine_unavailable"
    assert httpx.get(f"{served.url}/health/live").status_code == 200

    try:
        wait_ready(served.url, timeout_s=START_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(served.logs()) from exc
    assert chat(served.url)
    assert httpx.get(f"{served.url}/health/ready").json()["engine_restarts"] == 1
    assert "raas_engine_restarts_total 1.0" in httpx.get(f"{served.url}/metrics").text


def test_shutdown_stops_the_engine_with_no_orphans(served):
    family = descendants(served.process.pid)
    assert len(family) >= 2  # launcher plus its scheduler/detokenizer processes
    served.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so supervisors see it.
    assert served.process.wait(timeout=60) in (0, -signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive := [pid for pid in family if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"orphaned engine processes: {alive}"
        time.sleep(0.2)
    log = served.log_path.read_text()
    assert "engine.stopped" in log and "gateway.stopped" in log
