"""Per-request KV statistics from the real SGLang engine running `--attention-backend raas`.

The scheduler's numbers reach /generate's `meta_info["raas_kv_cache"]` and the OpenAI
`usage.kv_cache` (non-streaming, and the final usage chunk of a stream), the shape the
gateway merges. Every count is checked exactly against the policy's own bookkeeping
replayed for the same prompt length and token count (which pages go is decided by
attention scores, how many and when only by the budget). Generations stay short: the
bundled model decodes a few tokens per second here in float32. This engine runs the
policies per request on the host (RAAS_POLICY_STATE=host, the specification's path),
so the engine tests cover it too; every other engine test runs the default device state.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from raas_backend.policies import KVPolicyConfig
from raas_backend.policies.config import DEFAULT_ALPHA
from raas_backend.request_kv import RequestKV
from tests.support.sglang_server import sglang_server

pytestmark = pytest.mark.engine

PROMPT = "Once upon a time, in a small village by the sea,"
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
KV_CACHE_FIELDS = {
    "policy",
    "budget_tokens",
    "alpha",
    "peak_retained_tokens",
    "dense_equivalent_tokens",
    "evicted_pages",
}
RAAS_32 = {"name": "raas", "budget_tokens": 32}


@pytest.fixture(scope="module")
def server(bundled_model_path):
    with sglang_server(
        str(bundled_model_path),
        env={"RAAS_POLICY_STATE": "host"},
        attention_backend="raas",
        dtype="float32",
        max_total_tokens=2048,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def expected_stats(kv_policy: dict[str, Any], prompt_tokens: int, new_tokens: int) -> dict:
    """The policy's bookkeeping for a request of this shape: the engine decodes
    new_tokens - 1 steps (the prefill samples the first token), one token each."""
    kv = RequestKV(KVPolicyConfig(**kv_policy), prompt_len=prompt_tokens)
    for _ in range(new_tokens - 1):
        kv.begin_step()
    return kv.stats()


def assert_matches(reported: dict, kv_policy: dict, prompt_tokens: int, new_tokens: int):
    expected = expected_stats(kv_policy, prompt_tokens, new_tokens)
    for field in ("policy", "peak_retained_tokens", "dense_equivalent_tokens", "evicted_pages"):
        assert reported[field] == expected[field], field
    # What dense would have held: the prompt plus every decoded token but the last.
    assert reported["dense_equivalent_tokens"] == prompt_tokens + new_tokens - 1


def generate(url: str, new_tokens: int, kv_policy: dict, **extra: Any) -> httpx.Response:
    params = {
        "max_new_tokens": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "custom_params": {"kv_policy": kv_policy},
    }
    resp = httpx.post(
        f"{url}/generate",
        json={"text": PROMPT, "sampling_params": params, **extra},
        timeout=600,
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_generate_meta_info_has_the_final_stats(server):
    meta = generate(server.url, 80, RAAS_32).json()["meta_info"]
    kv, prompt = meta["raas_kv_cache"], meta["prompt_tokens"]
    assert meta["completion_tokens"] == 80
    assert (kv["policy"], kv["budget_tokens"]) == ("raas", 32)
    assert kv["evicted_pages"] > 0
    # Victims are freed before the new token's slot is allocated: held at most
    # prompt + budget, reached exactly once 32 decode tokens have been written.
    assert kv["peak_retained_tokens"] == prompt + 32
    assert kv["dense_equivalent_tokens"] == prompt + 80 - 1
    assert_matches(kv, RAAS_32, prompt, 80)


def test_generate_stream_reports_in_the_last_chunk_only(server):
    with httpx.stream(
        "POST",
        f"{server.url}/generate",
        json={
            "text": PROMPT,
            "stream": True,
            "sampling_params": {
                "max_new_tokens": 12,
                "temperature": 0.0,
                "ignore_eos": True,
                "custom_params": {"kv_policy": {"name": "dense"}},
            },
        },
        timeout=600,
    ) as resp:
        events = [
            json.loads(line.removeprefix("data: "))
            for line in resp.iter_lines()
            if line.startswith("data: {")
        ]
    metas = [e["meta_info"] for e in events]
    assert [("raas_kv_cache" in m) for m in metas] == [False] * (len(metas) - 1) + [True]
    kv, prompt = metas[-1]["raas_kv_cache"], metas[-1]["prompt_tokens"]
    assert kv["policy"] == "dense" and kv["evicted_pages"] == 0
    assert kv["peak_retained_tokens"] == kv["dense_equivalent_tokens"] == prompt + 11


def test_one_token_request_reports_its_prompt(server):
    meta = generate(server.url, 1, RAAS_32).json()["meta_info"]
    kv, prompt = meta["raas_kv_cache"], meta["prompt_tokens"]
    assert kv["peak_retained_tokens"] == kv["dense_equivalent_tokens"] == prompt
    assert kv["evicted_pages"] == 0


def test_chat_completion_usage_has_kv_cache(client, model):
    resp = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=48,
        temperature=0.0,
        extra_body={"custom_params": {"kv_policy": RAAS_32}, "ignore_eos": True},
    )
    usage = resp.usage
    kv = usage.model_extra["kv_cache"]
    assert resp.model_dump()["usage"]["kv_cache"] == kv
    assert set(kv) == KV_CACHE_FIELDS
    assert usage.completion_tokens == 48
    assert (kv["policy"], kv["budget_tokens"], kv["alpha"]) == ("raas", 32, DEFAULT_ALPHA)
    assert kv["evicted_pages"] > 0
    assert kv["peak_retained_tokens"] == usage.prompt_tokens + 32
    assert_matches(kv, RAAS_32, usage.prompt_tokens, 48)


def test_chat_stream_usage_chunk_has_kv_cache(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"custom_params": {"kv_policy": {"name": "dense"}}, "ignore_eos": True},
    )
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    kv = final.usage.model_extra["kv_cache"]
    assert set(kv) == KV_CACHE_FIELDS and kv["policy"] == "dense"
    assert kv["evicted_pages"] == 0
    assert kv["peak_retained_tokens"] == kv["dense_equivalent_tokens"]
    assert kv["dense_equivalent_tokens"] == final.usage.prompt_tokens + 12 - 1


def test_chat_with_n_choices_sums_them(client, model):
    resp = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        n=2,
        max_tokens=4,
        temperature=0.8,
        seed=1,
        extra_body={"custom_params": {"kv_policy": {"name": "dense"}}, "ignore_eos": True},
    )
    kv = resp.usage.model_extra["kv_cache"]
    assert kv["dense_equivalent_tokens"] == 2 * (resp.usage.prompt_tokens + 4 - 1)
    assert kv["peak_retained_tokens"] == kv["dense_equivalent_tokens"]


def test_completions_usage_has_kv_cache(client, model):
    policy = {"name": "streaming", "budget_tokens": 32}
    body = {"custom_params": {"kv_policy": policy}, "ignore_eos": True}
    resp = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0.0, extra_body=body
    )
    kv = resp.usage.model_extra["kv_cache"]
    assert set(kv) == KV_CACHE_FIELDS
    assert_matches(kv, policy, resp.usage.prompt_tokens, 8)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
        )
    )
    assert chunks[-1].usage.model_extra["kv_cache"] == kv
