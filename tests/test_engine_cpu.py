"""Stock SGLang on the CPU, loaded with our plugin, serving the bundled model for real."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.support.sglang_server import descendants, sglang_server, stop_process_group

pytestmark = pytest.mark.engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_greedy(bundled_model_path) -> list[tuple[list[int], list[int]]]:
    """HF transformers' greedy continuations in fp32: the ground truth."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_path)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32)
    results = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        results.append((ids[0].tolist(), greedy_tokens(model, ids, NEW_TOKENS)))
    return results


@pytest.fixture(scope="module")
def server(bundled_model_path, hf_greedy):
    with sglang_server(
        str(bundled_model_path), dtype="float32", attention_backend="torch_native"
    ) as srv:
        yield srv


def greedy_tokens(model, ids, n: int) -> list[int]:
    """Plain argmax decoding with the KV cache; EOS is an ordinary token (like ignore_eos)."""
    import torch

    out: list[int] = []
    past = None
    step_input = ids
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step_input = torch.tensor([[nxt]])
    return out


def generate_ids(url: str, input_ids: list[int], n: int) -> list[int]:
    resp = httpx.post(
        f"{url}/generate",
        json={
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
        },
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()["output_ids"]


def test_greedy_matches_transformers_token_for_token(server, hf_greedy):
    for input_ids, expected in hf_greedy:
        got = generate_ids(server.url, input_ids, NEW_TOKENS)
        assert got == expected


def test_chat_completion_is_well_formed(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    resp = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Name one colour."}],
        max_tokens=16,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_engine_shuts_down_without_orphans(server):
    tree = descendants(server.process.pid) | {server.process.pid}
    assert len(tree) >= 2, "expected the launcher and its scheduler/detokenizer children"
    stop_process_group(server.process)
    deadline = time.monotonic() + 15
    alive = tree
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in tree if os.path.exists(f"/proc/{pid}") and not _zombie(pid)}
        time.sleep(0.2)
    assert not alive, f"orphan processes left: {sorted(alive)}"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
