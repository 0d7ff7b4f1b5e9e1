"""The host's prediction of held tokens, victims and list lengths equals what each policy
does step by step (the CUDA path plans from these numbers without reading the device)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.retention import attended_tokens, retained_decode_tokens, victims_at


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["raas", "streaming", "h2o", "dense"]),
    page=st.sampled_from([1, 4, 16]),
    budget_pages=st.integers(2, 9),
    extra=st.integers(0, 15),
    prompt=st.integers(0, 40),
    steps=st.integers(1, 260),
    seed=st.integers(0, 2**16),
)
def test_prediction_equals_the_policies(name, page, budget_pages, extra, prompt, steps, seed):
    budget = budget_pages * page + min(extra, page - 1)
    recent = max(0, min(2 * page, budget - page))
    cfg = KVPolicyConfig(
        name=name, budget_tokens=budget, page_size=page, recent_tokens=recent, alpha=0.05
    )
    state = RequestKV(cfg, prompt_len=prompt)
    gen = torch.Generator().manual_seed(seed)
    frees = state.policy.frees_memory
    for d in range(1, steps + 1):
        before = state.table.evicted_pages
        state.begin_step()
        if state.needs_scores:
            state.add_layer_scores(torch.rand(len(state.pages), generator=gen) ** 3)
        table = state.table
        assert table.decode_len == d
        assert table.retained_decode_tokens == retained_decode_tokens(
            d, budget, page, frees_memory=frees
        )
        assert table.evicted_pages - before == victims_at(d, budget, page, frees_memory=frees)
        positions, _ = state.positions()
        assert positions.numel() == attended_tokens(prompt, d, budget, page, frees_memory=frees)
