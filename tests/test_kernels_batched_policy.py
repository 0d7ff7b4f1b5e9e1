"""Batched RaaS bookkeeping (`kernels.batched_policy`) against the per-request policy.

Both are driven with the same random page scores for many steps; after every step the
retained pages, their timestamps and the freed slots must agree. Runs on the CPU in CI,
and on CUDA too when a device is present.
"""

from __future__ import annotations

import random

import pytest
import torch

from raas_backend.kernels.batched_policy import (
    BatchedRaaSState,
    decode_step,
    min_capacity,
    victim_slots,
)
from raas_backend.policies import KVPolicyConfig, make_policy

PAGE = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_both(
    seed: int,
    device: str,
    alpha: float,
    refresh: float,
    steps: int = 150,
    fused: bool | None = None,
    zero_fraction: float = 0.0,
) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = rng.choice([1, 4, 9])
    prompts = [rng.choice([0, 3, 16, 40]) for _ in range(batch)]
    budgets = [rng.choice([32, 48, 64, 100]) for _ in range(batch)]
    configs = [
        KVPolicyConfig(name="raas", budget_tokens=bt, alpha=alpha, refresh_top_fraction=refresh)
        for bt in budgets
    ]
    policies = [make_policy(c, p) for c, p in zip(configs, prompts, strict=True)]
    cap = min_capacity(max(budgets), PAGE)
    state = BatchedRaaSState.empty(
        torch.tensor(prompts, device=device),
        torch.tensor(budgets, device=device),
        cap,
        PAGE,
    )
    max_context = max(prompts) + steps + 1
    req_to_token = torch.randperm(batch * max_context, generator=gen).view(batch, max_context)
    req_to_token = req_to_token.to(device)
    rows = torch.arange(batch, device=device)
    attended: list[list[int]] = [[] for _ in range(batch)]
    for step in range(1, steps + 1):
        per_req = [torch.rand(len(a), generator=gen) ** 3 for a in attended]
        # Pages no head attended: the adaptive refresh must not mark them, even in its top.
        for s in per_req:
            s[torch.rand(len(s), generator=gen) < zero_fraction] = 0.0
        for pol, s in zip(policies, per_req, strict=True):
            pol.update(s, step - 1)
        flat = torch.cat(per_req).to(device) if step > 1 else None
        evicted = decode_step(state, flat, step, alpha, refresh, fused=fused)
        freed_batched = victim_slots(evicted, state.prompt_lens, PAGE, req_to_token, rows).tolist()
        freed_ref: list[int] = []
        for b, pol in enumerate(policies):
            pol.on_token(step)
            chosen = pol.victims()
            positions = pol.table.evict(chosen) if chosen else []
            freed_ref += req_to_token[b, positions].tolist()
            attended[b] = pol.attended_pages()
        assert sorted(freed_batched) == sorted(freed_ref), f"step {step}"
        pages = state.pages.cpu()
        last = state.last_used.cpu()
        for b, pol in enumerate(policies):
            n = int(state.num_pages[b])
            assert pages[b, :n].tolist() == pol.table.retained, f"step {step} request {b}"
            assert (pages[b, n:] == -1).all()
            assert last[b, :n].tolist() == [pol.last_used[p] for p in pol.table.retained]
            assert int(state.seq_lens[b]) == pol.table.seq_len


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_batched_raas_matches_per_request_policy(seed: int, device: str) -> None:
    run_both(seed, device, alpha=0.3, refresh=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_adaptive_variant_matches(device: str) -> None:
    run_both(11, device, alpha=0.9, refresh=0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_adaptive_variant_skips_unattended_pages(device: str) -> None:
    run_both(12, device, alpha=0.9, refresh=0.5, zero_fraction=0.7)


def test_keeps_attended_old_page_and_evicts_newer_unattended() -> None:
    """The behaviour StreamingLLM cannot show: an old, attended page outlives newer ones."""
    state = BatchedRaaSState.empty(
        torch.tensor([4]), torch.tensor([3 * PAGE]), min_capacity(3 * PAGE, PAGE), PAGE
    )
    scores = None
    for step in range(1, 6 * PAGE):
        decode_step(state, scores, step, alpha=0.1)
        n = int(state.num_pages[0])
        # Page 0 is always attended; every other page never.
        scores = torch.tensor([0.9 if p == 0 else 0.0 for p in state.pages[0, :n].tolist()])
    retained = state.pages[0, : int(state.num_pages[0])].tolist()
    assert retained[0] == 0
    assert 1 not in retained


def test_scores_of_wrong_length_are_rejected() -> None:
    state = BatchedRaaSState.empty(torch.tensor([0]), torch.tensor([64]), 6, PAGE)
    decode_step(state, None, 1, alpha=0.1)
    with pytest.raises(ValueError, match="expected 1 page scores, got 2"):
        decode_step(state, torch.tensor([0.5, 0.5]), 2, alpha=0.1)
