"""The memory win, shown on the real engine: a KV pool too small for N dense generations.

SGLang sizes requests by their whole generation; the raas plugin's budget-aware
admission (raas_backend/sglang_plugin/admission.py) sizes a request under a freeing
policy by prompt + budget + one page instead. On a 512-token pool:

- four 160-token generations run all at once under raas (budget 32), with no retraction,
  while dense cannot hold them together (it queues or retracts);
- one raas generation longer than the whole pool completes in full (SGLang would clip
  it to what fits the pool; with ignore_eos such a clipped dense request is never
  even admitted, a stock SGLang limit);
- a raas request that SGLang retracts under memory pressure (a dense request grows into
  its room) is re-prefilled with its whole history, evicted back to its budget, and
  still completes a generation longer than the pool.

A tiny random-weight model keeps it fast; what is measured is the allocator, not text.
Its own module: one engine-holding fixture per module (the machine-wide engine lock).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.sglang_server import assert_engine_log_clean
from tests.support.tiny_model import tiny_engine
from tests.test_raas_engine import metric, wait_idle

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
        # The four generations of one batched request must reach the scheduler in one
        # receive: a scheduler sleeping on its socket wakes at the first and may admit
        # the rest a step later, when this small pool no longer has room to run them
        # beside the first ones (the order the peak is read from).
        sleep_on_idle=False,
        env={"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"},
    ) as srv:
        yield srv


@dataclass
class Outcome:
    completion_tokens: int
    finish_reason: Any
    retractions: int
    kv: dict[str, Any] | None = None


def generate_chunks(
    url: str, input_ids: list[Any], policy: dict[str, Any], max_new_tokens: int
) -> Iterator[dict[str, Any]]:
    """The chunks of one streamed /generate request (a batch when input_ids is a list
    of prompts), in the order the engine sent them."""
    body = {
        "input_ids": input_ids,
        "stream": True,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "custom_params": {"kv_policy": policy},
        },
    }
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{url}/generate", json=body) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                yield json.loads(line[len("data:") :])


def stream_generate(
    url: str,
    policy: dict[str, Any],
    max_new_tokens: int,
    decoding: threading.Event | None = None,
) -> Outcome:
    """One streamed generation; `decoding` is set once its first token arrives."""
    last: dict[str, Any] = {}
    for chunk in generate_chunks(url, PROMPT, policy, max_new_tokens):
        if decoding is not None and chunk["meta_info"]["completion_tokens"] > 0:
            decoding.set()
        last = chunk
    assert last and last["meta_info"]["completion_tokens"] > 0, "the stream carried no token"
    return Outcome(
        completion_tokens=last["meta_info"]["completion_tokens"],
        finish_reason=last["meta_info"]["finish_reason"],
        retractions=last["meta_info"].get("num_retractions", 0),
        kv=last["meta_info"].get("raas_kv_cache"),
    )


def run_concurrently(url: str, policy: dict[str, Any]) -> tuple[list[int], int]:
    """CONCURRENT generations sent as one batch: (completion tokens of each, largest
    number decoding at the same time).

    One batched request reaches the scheduler at once, and its one stream carries every
    generation's chunks in the order the engine produced them; so "decoding together"
    is read from that order (a first chunk before another's last one), not from client
    clocks, which a CPU-starved client would skew."""
    produced = [0] * CONCURRENT
    live = peak = 0
    for chunk in generate_chunks(url, [PROMPT] * CONCURRENT, policy, NEW_TOKENS):
        i, meta = chunk["index"], chunk["meta_info"]
        if produced[i] == 0 and meta["completion_tokens"] > 0:
            live += 1
            peak = max(peak, live)
        produced[i] = meta["completion_tokens"]
        if meta["finish_reason"] is not None:
            live -= 1
    return produced, peak


def test_pool_too_small_for_dense_serves_all_raas_requests_at_once(small_pool_server):
    url = small_pool_server.url
    capacity = metric(url, "kv_available_tokens") + metric(url, "num_used_tokens")
    assert capacity < CONCURRENT * (len(PROMPT) + NEW_TOKENS)

    retracted = metric(url, "num_retracted_requests_total", 0.0)
    dense, dense_peak = run_concurrently(url, {"name": "dense"})
    dense_retracted = metric(url, "num_retracted_requests_total", 0.0) - retracted
    assert dense == [NEW_TOKENS] * CONCURRENT
    # Dense cannot decode all four together: SGLang queues (or retracts) some of them.
    assert dense_peak < CONCURRENT or dense_retracted > 0, (dense_peak, dense_retracted)
    wait_idle(url)

    retracted = metric(url, "num_retracted_requests_total", 0.0)
    raas, raas_peak = run_concurrently(url, RAAS)
    assert metric(url, "num_retracted_requests_total", 0.0) == retracted
    assert raas == [NEW_TOKENS] * CONCURRENT
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
    assert_engine_log_clean(small_pool_server.log_path)


def dense_then_raas(url: str, dense_tokens: int, raas_tokens: int) -> dict[str, Outcome]:
    """A dense request, then a raas request sent the moment the dense one decodes."""
    results: dict[str, Outcome] = {}
    dense_decoding = threading.Event()

    def run(name: str, policy: dict[str, Any], tokens: int, event: threading.Event | None) -> None:
        results[name] = stream_generate(url, policy, tokens, event)

    dense = threading.Thread(
        target=run, args=("dense", {"name": "dense"}, dense_tokens, dense_decoding)
    )
    dense.start()
    try:
        # The dense request's first chunk goes out only once it decodes; a raas request
        # sent now has fewer output tokens than it for as long as both run.
        assert dense_decoding.wait(timeout=120), "the dense request never decoded"
        run("raas", RAAS, raas_tokens, None)
    finally:
        dense.join(timeout=300)
    assert not dense.is_alive() and "dense" in results, "the dense request did not finish"
    return results


RETRACTION_ATTEMPTS = 3


def test_retracted_raas_request_resumes_within_its_budget(small_pool_server):
    """SGLang retracts the decoding request with the fewest output tokens when the pool
    runs out. A dense request (prompt + 440 tokens) starts first; a raas request (budget
    32) joins once it decodes, so the two need more than the pool near the dense one's
    end and the raas one is retracted. It is re-prefilled with its whole history once
    the dense one finishes; then its generated positions must count as decode pages
    again and be evicted back to the budget, or it would end holding its history.

    SGLang admits the raas request only while the dense one has ~366 tokens or fewer
    left to reserve for; a client starved of CPU for that long (seconds, on a loaded
    2-core machine) sends it too late, both then run one after the other and nothing is
    retracted. That is a property of the load, not of the backend, so the scenario is
    run again (each run must still finish both requests in full and free everything)."""
    url = small_pool_server.url
    capacity = metric(url, "kv_available_tokens") + metric(url, "num_used_tokens")
    dense_tokens, raas_tokens = 440, POOL_TOKENS + 88
    cap = RAAS["budget_tokens"] + 16  # budget + one page
    assert len(PROMPT) + dense_tokens <= capacity < len(PROMPT) + dense_tokens + len(PROMPT) + cap
    assert capacity < len(PROMPT) + raas_tokens

    retracted = False
    for _attempt in range(RETRACTION_ATTEMPTS):
        retracted_before = metric(url, "num_retracted_requests_total", 0.0)
        results = dense_then_raas(url, dense_tokens, raas_tokens)
        assert results["dense"].completion_tokens == dense_tokens
        assert results["raas"].completion_tokens == raas_tokens
        retracted = metric(url, "num_retracted_requests_total", 0.0) > retracted_before
        if retracted:
            break
        wait_idle(url)
        assert metric(url, "kv_available_tokens") == capacity
    assert retracted, f"no retraction in {RETRACTION_ATTEMPTS} runs: the raas one joined too late"

    raas = results["raas"]
    assert (raas.retractions, results["dense"].retractions) == (1, 0)
    assert raas.finish_reason["type"] == "length"
    kv = raas.kv
    assert kv is not None and kv["policy"] == "raas"
    prompt = len(PROMPT)
    # The re-prefill held the whole history at once: proof that this request was the
    # one retracted and resumed (a raas request otherwise peaks at prompt + budget).
    assert kv["peak_retained_tokens"] > prompt + cap, kv
    # ... and from its next decode step it was bounded again (victims are freed before
    # each step's new slot: prompt + budget at most).
    assert kv["retained_tokens"] <= prompt + RAAS["budget_tokens"], kv
    assert kv["dense_equivalent_tokens"] == prompt + raas_tokens - 1
    assert kv["evicted_pages"] > 0
    wait_idle(url)
    assert metric(url, "kv_available_tokens") == capacity
    assert_engine_log_clean(small_pool_server.log_path)
