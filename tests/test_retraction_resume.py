"""A retracted request stays bounded by its budget after SGLang re-prefills it.

SGLang retracts a decoding request when the pool runs short and later re-prefills its
whole history. Treated as a new prompt, that history would never be evicted again. The
runtime keeps the retracted request's state and, at its next decode step, counts the
generated positions as decode pages again. Here the runtime and the release hook are
driven as the scheduler drives them, with a fake request and row (no engine).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.sglang_plugin import runtime as runtime_module
from raas_backend.sglang_plugin import scheduler_hooks
from raas_backend.sglang_plugin.runtime import RaasRuntime

PROMPT, BUDGET, PAGE = 10, 32, 16
RAAS = {"kv_policy": {"name": "raas", "budget_tokens": BUDGET}}


def decode(kv: RequestKV, steps: int) -> list[int]:
    freed: list[int] = []
    for _ in range(steps):
        freed += kv.begin_step()
    return freed


def test_resumed_request_is_evicted_back_to_its_budget():
    rt = RaasRuntime(defaults=KVPolicyConfig())
    kv = rt.track(row=1, rid="a", custom_params=RAAS, kv_len=PROMPT)
    decode(kv, 100)
    first_evicted = kv.table.evicted_pages
    assert first_evicted > 0
    rt.release(1, "a", retracted=True)
    assert rt.get(1) is None and "a" in rt.suspended

    # Re-prefilled into another row with prompt + 100 generated positions, all resident.
    resumed = rt.track(row=5, rid="a", custom_params=RAAS, kv_len=PROMPT + 100)
    assert "a" not in rt.suspended and "a" not in rt.finished
    assert resumed.table.prompt_len == PROMPT
    assert resumed.table.seq_len == PROMPT + 100
    freed = resumed.begin_step()
    # Every freed position is a generated one of the new row, never the prompt or tail.
    assert freed and min(freed) >= PROMPT
    assert resumed.table.retained_decode_tokens <= BUDGET
    assert len(freed) == 101 - resumed.table.retained_decode_tokens
    stats = resumed.stats()
    # The re-prefill held the whole history once; the evictions of both lives count.
    assert stats["peak_retained_tokens"] == PROMPT + 100
    assert stats["evicted_pages"] == first_evicted + len(freed) // PAGE
    assert stats["dense_equivalent_tokens"] == PROMPT + 101


def test_finished_request_is_not_resumed():
    rt = RaasRuntime(defaults=KVPolicyConfig())
    decode(rt.track(row=1, rid="a", custom_params=RAAS, kv_len=PROMPT), 50)
    rt.release(1, "a")
    assert "a" not in rt.suspended
    assert rt.track(row=1, rid="b", custom_params=RAAS, kv_len=PROMPT).table.prompt_len == PROMPT


def test_resume_rejects_a_history_shorter_than_the_prompt():
    kv = RequestKV(KVPolicyConfig(name="raas", budget_tokens=BUDGET), prompt_len=PROMPT)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        RequestKV.resumed(kv, PROMPT - 1)


@pytest.mark.parametrize(("finished", "suspended"), [(False, True), (True, False)])
def test_release_hook_tells_retraction_from_finish(monkeypatch, finished, suspended):
    rt = RaasRuntime(defaults=KVPolicyConfig())
    monkeypatch.setattr(runtime_module, "_RUNTIME", rt)
    decode(rt.track(row=3, rid="r", custom_params=RAAS, kv_len=PROMPT), 40)
    req = SimpleNamespace(rid="r", kv=SimpleNamespace(req_pool_idx=3), finished=lambda: finished)
    scheduler_hooks.around_release_kv_cache(lambda r: None, req)
    assert ("r" in rt.suspended) is suspended
    assert rt.get(3) is None and "r" in rt.finished


def test_resumed_slots_go_back_to_the_allocator_once():
    """The hook frees the evicted generated positions of the new row, each slot once."""
    rt = RaasRuntime(defaults=KVPolicyConfig())
    decode(rt.track(row=0, rid="a", custom_params=RAAS, kv_len=PROMPT), 60)
    rt.release(0, "a", retracted=True)

    kv_len = PROMPT + 60
    rtt = torch.zeros(2, 256, dtype=torch.int32)
    rtt[1, :kv_len] = torch.arange(1000, 1000 + kv_len, dtype=torch.int32)
    freed: list[int] = []
    batch = SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode=lambda: True),
        req_to_token_pool=SimpleNamespace(req_to_token=rtt),
        token_to_kv_pool_allocator=SimpleNamespace(free=lambda s: freed.extend(s.tolist())),
        seq_lens_cpu=torch.tensor([kv_len]),
        reqs=[
            SimpleNamespace(
                rid="a",
                kv=SimpleNamespace(req_pool_idx=1),
                sampling_params=SimpleNamespace(custom_params=RAAS),
            )
        ],
    )
    previous = runtime_module._RUNTIME
    runtime_module._RUNTIME = rt
    try:
        scheduler_hooks.before_decode_alloc(batch)
    finally:
        runtime_module._RUNTIME = previous
    assert freed and len(set(freed)) == len(freed)
    assert min(freed) >= 1000 + PROMPT  # generated positions only, never the prompt
    assert rt.get(1).table.retained_decode_tokens <= BUDGET
