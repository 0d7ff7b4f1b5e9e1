"""The `raas` backend inside the real SGLang engine on the CPU (subprocess, real HTTP).

- with a budget larger than the sequence, raas == stock torch_native, token for token;
- with a small budget, SGLang's greedy output == reference.py's for the same policy;
- SGLang's own KV accounting shows a raas request holding at most prompt + budget + one
  page while dense grows with length;
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.sglang_server import sglang_server

pytestmark = pytest.mark.engine

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "To solve 17 * 23, we first",
]
PAGE = 16
SMALL_POOL = 640


def generate(
    url: str, input_ids: list[int], n: int, kv_policy: dict | None = None, **extra
) -> dict:
    params = {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}
    if kv_policy is not None:
        params["custom_params"] = {"kv_policy": kv_policy}
    resp = httpx.post(
        f"{url}/generate",
        json={"input_ids": input_ids, "sampling_params": params, **extra},
        timeout=600,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(url: str, name: str, default: float | None = None) -> float:
    """Sum of an SGLang metric over its labels; labelled counters appear on first use."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"sglang:{name}{{") or line.startswith(f"sglang:{name} ")
    ]
    if not values and default is not None:
        return default
    assert values, f"metric sglang:{name} not exported"
    return sum(values)


def wait_idle(url: str) -> None:
    """Until the engine holds no KV (a finished request's slots go back at once; the
    metric follows within a moment), failing after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(url, "num_used_tokens") != 0:
        time.sleep(0.2)
    assert metric(url, "num_used_tokens") == 0


@pytest.fixture(scope="module")
def tokenized(bundled_model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_path)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def torch_native_outputs(bundled_model_path, tokenized) -> list[list[int]]:
    with sglang_server(
        str(bundled_model_path), dtype="float32", attention_backend="torch_native"
    ) as srv:
        return [generate(srv.url, ids, 48)["output_ids"] for ids in tokenized]


@pytest.fixture(scope="module")
def raas_server(bundled_model_path, torch_native_outputs):
    with sglang_server(
        str(bundled_model_path),
        dtype="float32",
        attention_backend="raas",
        max_total_tokens=SMALL_POOL,
        extra_args=("--decode-log-interval", "4"),
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference_runner(bundled_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    from raas_backend.reference import PolicyRunner

    # One thread: the idle engine's scheduler polls, and two torch threads fighting it
    # for two cores make every small op of the reference slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32)
    yield PolicyRunner(model)
    torch.set_num_threads(threads)


def test_large_budget_equals_stock_torch_native(raas_server, tokenized, torch_native_outputs):
    for ids, expected in zip(tokenized, torch_native_outputs, strict=True):
        got = generate(raas_server.url, ids, 48, {"name": "raas", "budget_tokens": 4096})
        assert got["output_ids"] == expected


@pytest.mark.parametrize(
    "kv_policy",
    [
        {"name": "raas", "budget_tokens": 32},
        {"name": "raas", "budget_tokens": 48, "alpha": 0.01},
        {"name": "streaming", "budget_tokens": 32},
        {"name": "h2o", "budget_tokens": 48, "recent_tokens": 16},
        {"name": "quest", "budget_tokens": 32},
        {"name": "quest", "budget_tokens": 32, "quest_selection": "layer"},
    ],
    ids=lambda p: "-".join(str(v) for v in p.values()),
)
def test_small_budget_matches_reference(raas_server, reference_runner, tokenized, kv_policy):
    from raas_backend.policies import KVPolicyConfig

    n = 64
    ids = tokenized[0]
    expected = reference_runner.generate(ids, KVPolicyConfig(**kv_policy), n)
    if kv_policy["name"] != "quest":
        assert expected.stats["evicted_pages"] > 0, "the budget must actually bind"
    got = generate(raas_server.url, ids, n, kv_policy)["output_ids"]
    assert got == expected.tokens


def _peak_used_while(url: str, work) -> float:
    """Largest sglang:num_used_tokens seen while `work()` runs in a thread."""
    peak = 0.0
    thread = threading.Thread(target=work)
    thread.start()
    while thread.is_alive():
        peak = max(peak, metric(url, "num_used_tokens"))
        time.sleep(0.1)
    thread.join()
    return peak


def test_engine_kv_usage_is_bounded_by_budget(raas_server, tokenized):
    ids = tokenized[1]
    n, budget = 160, 32
    raas_peak = _peak_used_while(
        raas_server.url,
        lambda: generate(raas_server.url, ids, n, {"name": "raas", "budget_tokens": budget}),
    )
    dense_peak = _peak_used_while(
        raas_server.url, lambda: generate(raas_server.url, ids, n, {"name": "dense"})
    )
    assert 0 < raas_peak <= len(ids) + budget + PAGE
    # Dense holds every token. Sampled every 0.1 s, so the last steps may be missed (by
    # seconds on a loaded machine): enough that it held far more than raas ever may.
    assert dense_peak > len(ids) + 2 * (budget + PAGE)
    wait_idle(raas_server.url)


def test_invalid_kv_policy_is_a_400_and_the_engine_survives(raas_server, tokenized):
    for bad in (
        {"name": "nope"},
        {"name": "raas", "budget_tokens": 3},
        {"name": "raas", "alpha": 2},
    ):
        resp = httpx.post(
            f"{raas_server.url}/generate",
            json={
                "input_ids": tokenized[0],
                "sampling_params": {"max_new_tokens": 4, "custom_params": {"kv_policy": bad}},
            },
            timeout=60,
        )
        assert resp.status_code == 400, resp.text
        assert "kv_policy" in resp.text
    assert generate(raas_server.url, tokenized[0], 4, {"name": "raas"})["output_ids"]
