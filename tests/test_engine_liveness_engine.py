"""Engine liveness with a real SGLang on the CPU: busy is not dead, dead is seen at once.

`raas-serve serve` (embedded mode, its own process) supervises SGLang on the bundled model
with a short context and probes tight enough that a supervisor trusting SGLang's
generation probe alone would restart the engine during one long prefill: a round every
half second, 2 s to answer, two failed rounds. The bundled model prefills about a hundred
tokens a second here, so a prompt near the context limit keeps the scheduler silent for
many rounds. In order:

- a prompt near the context limit, with another request streaming beside it: both
  finish, the engine is never restarted, and the supervisor did see it busy;
- the scheduler killed (SIGKILL, so SGLang's own crash handling never runs): readiness is
  503 within a tick and a chat request gets a 503 with Retry-After at once, not a hang;
  then the engine comes back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.embedded_gateway import Served, embedded_gateway
from tests.support.gateway_server import wait_ready
from tests.support.sglang_server import START_TIMEOUT_S, descendants
from tests.test_gateway_engine import LONG, MODEL, client

pytestmark = pytest.mark.engine

CONTEXT = 3072
# SGLang's generation probe answers an idle engine after a second at best: 2 s to answer.
INTERVAL_S, TIMEOUT_S, THRESHOLD = 0.5, 2, 2
# One word, one token in SmolLM2's tokenizer: the prompt lands near the context limit.
WORD = " lamp"
PROMPT_WORDS = 2900


@pytest.fixture(scope="module")
def served(bundled_model_path, tmp_path_factory) -> Iterator[Served]:
    env = {
        "RAAS_ENGINE_EXTRA_ARGS": json.dumps(["--context-length", str(CONTEXT)]),
        "RAAS_ENGINE_HEALTH_INTERVAL_S": str(INTERVAL_S),
        "RAAS_ENGINE_HEALTH_TIMEOUT_S": str(TIMEOUT_S),
        "RAAS_ENGINE_UNHEALTHY_THRESHOLD": str(THRESHOLD),
        "RAAS_ENGINE_STALL_TIMEOUT_S": "120",
    }
    workdir = tmp_path_factory.mktemp("liveness")
    with embedded_gateway(bundled_model_path, workdir, env) as srv:
        yield srv


def readiness(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health/ready", timeout=5)


def test_long_prefill_beside_a_stream_is_busy_not_dead(served):
    engine_pid = served.engine_pid()
    results: dict[str, Any] = {}
    failures: list[BaseException] = []

    def long_prompt() -> None:
        try:
            started = time.monotonic()
            resp = client(served.url, timeout=240).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count:" + WORD * PROMPT_WORDS}],
                max_tokens=4,
            )
            results["long"] = resp.usage.prompt_tokens
            results["long_s"] = time.monotonic() - started
        except BaseException as exc:
            failures.append(exc)

    stream = client(served.url, timeout=240).chat.completions.create(
        model=MODEL,
        messages=LONG,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # the stream is decoding before the long prompt arrives
    thread = threading.Thread(target=long_prompt)
    thread.start()
    streamed = [c for c in chunks if c.usage][-1].usage.completion_tokens
    thread.join(240)

    assert not thread.is_alive() and not failures, failures
    assert streamed == 48
    assert results["long"] >= 0.9 * CONTEXT
    # The scheduler was silent long enough for a generation-probe-only supervisor to give
    # up on it (THRESHOLD rounds of INTERVAL_S + TIMEOUT_S), or this test proves nothing.
    assert results["long_s"] > 1.5 * THRESHOLD * (INTERVAL_S + TIMEOUT_S), results
    log = served.log_path.read_text()
    assert "engine.busy" in log
    assert "engine.unresponsive" not in log
    assert readiness(served.url).json()["engine_restarts"] == 0
    assert served.engine_pid() == engine_pid


def scheduler_pid(served: Served) -> int:
    for pid in descendants(served.engine_pid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sglang::scheduler"):
                return pid
        except OSError:
            continue
    raise LookupError("no SGLang scheduler process found")


def test_dead_scheduler_is_503_with_retry_after_at_once_then_recovers(served):
    os.kill(scheduler_pid(served), signal.SIGKILL)
    killed = time.monotonic()
    while readiness(served.url).status_code != 503:
        # A tick of the process check (0.2 s) and some room for a loaded machine; waiting
        # for probes to fail would take THRESHOLD rounds (5 s here).
        assert time.monotonic() - killed < 2.5, "readiness stayed 200 with a dead scheduler"
        time.sleep(0.05)
    assert readiness(served.url).headers["retry-after"] == "5"

    started = time.monotonic()
    resp = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": MODEL, "messages": LONG, "max_tokens": 4},
        timeout=30,
    )
    assert time.monotonic() - started < 2
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "engine_unavailable"
    assert resp.headers["retry-after"] == "5"

    try:
        wait_ready(served.url, timeout_s=START_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(served.logs()) from exc
    assert readiness(served.url).json()["engine_restarts"] == 1
    assert "engine.worker_died" in served.log_path.read_text()
