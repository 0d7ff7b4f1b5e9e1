"""The memory win, shown on the real engine: a KV pool too small for N dense generations.

SGLang sizes requests by their whole generation; the raas plugin's budget-aware
admission (raas_backend/sglang_plugin/admission.py) sizes a request under a freeing
policy by prompt + budget + one page instead. On a 512-token pool:

- four 160-token generations run all at once under raas (budget 32), with no retraction,
  while dense cannot hold them together (it queues or retracts);
- one raas generation longer than the whole pool completes in full (SGLang would clip
  it to what fits the pool; with ignore_eos such a clipped dense request is never
  even admitted, a stock SGLang limit).

A tiny random-weight model keeps it fast; what is measured is the allocator, not text.
Its own module: one engine-holding fixture per module (the machine-wide engine lock).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.tiny_model import tiny_engine
from tests.test_raas_engine import metric

pytestmark = pytest.mark.engine

POOL_TOKENS = 512
PROMPT = list(range(100, 124))  # 24 tokens
CONCURRENT = 4
NEW_TOKENS = 160  # 4 x (24 + 160) > 512 > 4 x (24 + 32 + 16)
RAAS = {"name": "raas", "budget_tokens": 32}


@pytest.fixture(scope="module")
def small_pool_server(bundled_model_path, tmp_path_factory):
    with tiny_engine(
        Path(bundled_model_path),
        tmp_path_factory.mktemp("tiny"),
        max_total_tokens=POOL_TOKENS,
        context_length=2048,
        max_running_requests=8,
        env={"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"},
    ) as srv:
        yield srv


@dataclass
class Timeline:
    first_token_s: float
    done_s: float
    completion_tokens: int
    finish_reason: Any


def stream_generate(url: str, policy: dict[str, Any], max_new_tokens: int) -> Timeline:
    body = {
        "input_ids": PROMPT,
        "stream": True,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "custom_params": {"kv_policy": policy},
        },
    }
    first = None
    last: dict[str, Any] = {}
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{url}/generate", json=body) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:") :])
            if first is None and chunk["meta_info"]["completion_tokens"] > 0:
                first = time.monotonic()
            last = chunk
    assert first is not None and last, "the stream carried no token"
    return Timeline(
        first_token_s=first,
        done_s=time.monotonic(),
        completion_tokens=last["meta_info"]["completion_tokens"],
        finish_reason=last["meta_info"]["finish_reason"],
    )


def run_concurrently(url: str, policy: dict[str, Any]) -> tuple[list[Timeline], int]:
    """(per-request timelines, largest number decoding at the same time)."""
    results: list[Timeline | None] = [None] * CONCURRENT

    def one(i: int) -> None:
        results[i] = stream_generate(url, policy, NEW_TOKENS)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    timelines = [r for r in results if r is not None]
    assert len(timelines) == CONCURRENT, "a request did not finish"
    events = sorted(
        [(t.first_token_s, 1) for t in timelines] + [(t.done_s, -1) for t in timelines],
        key=lambda e: (e[0], e[1]),
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return timelines, peak


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(url, "num_used_tokens") != 0:
        time.sleep(0.2)
    assert metric(url, "num_used_tokens") == 0


def test_pool_too_small_for_dense_serves_all_raas_requests_at_once(small_pool_server):
    url = small_pool_server.url
    capacity = metric(url, "kv_available_tokens") + metric(url, "num_used_tokens")
    assert capacity < CONCURRENT * (len(PROMPT) + NEW_TOKENS)

    retracted = metric(url, "num_retracted_requests_total", 0.0)
    dense, dense_peak = run_concurrently(url, {"name": "dense"})
    dense_retracted = metric(url, "num_retracted_requests_total", 0.0) - retracted
    assert all(t.completion_tokens == NEW_TOKENS for t in dense)
    # Dense cannot decode all four together: SGLang queues (or retracts) some of them.
    assert dense_peak < CONCURRENT or dense_retracted > 0, (dense_peak, dense_retracted)
    wait_idle(url)

    retracted = metric(url, "num_retracted_requests_total", 0.0)
    raas, raas_peak = run_concurrently(url, RAAS)
    assert metric(url, "num_retracted_requests_total", 0.0) == retracted
    assert all(t.completion_tokens == NEW_TOKENS for t in raas)
    assert raas_peak == CONCURRENT
    wait_idle(url)
    assert metric(url, "kv_available_tokens") == capacity


def test_raas_generation_longer_than_the_pool_completes(small_pool_server):
    url = small_pool_server.url
    capacity = metric(url, "kv_available_tokens") + metric(url, "num_used_tokens")
    longer_than_pool = POOL_TOKENS + 300
    assert capacity < longer_than_pool
    raas = stream_generate(url, RAAS, longer_than_pool)
    assert raas.completion_tokens == longer_than_pool
    assert raas.finish_reason["type"] == "length"
    wait_idle(url)
    log = small_pool_server.log_path.read_text(errors="replace")
    for bad in ("use-after-free", "double free", "Mem Leak", "Traceback"):
        assert bad not in log
