"""No KV slot leaked or freed twice after hundreds of requests through the raas backend.

Mixed policies, random lengths and client disconnects (aborts), on a tiny random-weight
model (speed) with SGLang's own page-invariant and busy-time leak checks switched on.
Its own module: module-scoped engines of another module would still hold the
machine-wide engine lock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.sglang_server import assert_engine_log_clean
from tests.support.tiny_model import tiny_engine
from tests.test_raas_engine import metric

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_server(bundled_model_path, tmp_path_factory):
    with tiny_engine(
        Path(bundled_model_path),
        tmp_path_factory.mktemp("tiny"),
        max_total_tokens=4096,
        env={
            "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
            "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
        },
    ) as srv:
        yield srv


def test_no_slot_leak_after_hundreds_of_mixed_requests(tiny_server):
    url = tiny_server.url
    capacity = metric(url, "kv_available_tokens") + metric(url, "num_used_tokens")
    policies = [
        {"name": "raas", "budget_tokens": 32},
        {"name": "raas", "budget_tokens": 48, "alpha": 0.0, "refresh_top_fraction": 0.25},
        {"name": "streaming", "budget_tokens": 32},
        {"name": "h2o", "budget_tokens": 64, "recent_tokens": 16},
        {"name": "quest", "budget_tokens": 32},
        {"name": "dense"},
    ]
    errors: list[str] = []
    aborted = 0

    def worker(k: int) -> None:
        nonlocal aborted
        with httpx.Client(timeout=120) as client:
            for i in range(k, 240, 8):
                policy = policies[i % len(policies)]
                params = {
                    "max_new_tokens": 40 + (i * 7) % 60,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "custom_params": {"kv_policy": policy},
                }
                body = {"input_ids": list(range(100, 110 + i % 30)), "sampling_params": params}
                if i % 5 == 0:
                    # Client disconnects mid-stream: SGLang aborts the request. Cut before
                    # any eviction, and after the budget-32 policies have evicted pages
                    # (their rows then hold freed positions when the abort frees them).
                    params["max_new_tokens"] = 120
                    cut = (3, 45, 80)[(i // 5) % 3]
                    body["stream"] = True
                    tokens = 0
                    with client.stream("POST", f"{url}/generate", json=body) as resp:
                        for line in resp.iter_lines():
                            if line.startswith("data: {"):
                                meta = json.loads(line[6:])["meta_info"]
                                tokens = meta["completion_tokens"]
                            if tokens >= cut:
                                break
                    if tokens >= cut:
                        aborted += 1
                    else:
                        errors.append(f"stream ended after {tokens} of {cut} tokens")
                    continue
                resp = client.post(f"{url}/generate", json=body)
                if (
                    resp.status_code != 200
                    or len(resp.json()["output_ids"]) != params["max_new_tokens"]
                ):
                    errors.append(f"{resp.status_code}: {resp.text[:200]}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert aborted >= 40

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(url, "num_used_tokens") != 0:
        time.sleep(0.5)
    assert metric(url, "num_used_tokens") == 0
    assert metric(url, "kv_available_tokens") == capacity
    assert_engine_log_clean(tiny_server.log_path)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
