"""Quest's per-KV-group selection (the paper's: each KV head picks its own pages) against
straightforward re-implementations on small tensors: which pages each group picks
(RequestKV.select_for_layer), what each head then attends (kv_head_mask with the torch
decode kernels), and the reference model run end to end on a tiny GQA model."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.kernels.torch_ref import attend_one, sparse_decode
from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV

PAGE = 4


def _state(budget_pages: int, decode_tokens: int, prompt: int, **kw) -> RequestKV:
    config = KVPolicyConfig(name="quest", budget_tokens=budget_pages * PAGE, page_size=PAGE, **kw)
    kv = RequestKV(config, prompt_len=prompt)
    for _ in range(decode_tokens):
        kv.begin_step()
    return kv


def _expected_groups(bounds, retained, tail, keep, hkv, agg):
    """Per KV head: its group's query heads' bounds, aggregated; the tail page always,
    then the highest others, up to `keep` pages; ascending."""
    group = bounds.shape[1] // hkv
    out = []
    for g in range(hkv):
        cols = bounds[:, g * group : (g + 1) * group]
        score = cols.max(dim=1).values if agg == "max" else cols.mean(dim=1)
        if len(retained) <= keep:
            out.append(list(retained))
            continue
        ranked = sorted(
            (p for p in retained if p != tail),
            key=lambda p: -float(score[retained.index(p)]),
        )
        out.append(sorted([tail, *ranked[: keep - 1]]))
    return out


@settings(max_examples=150, deadline=None)
@given(
    hkv=st.integers(1, 4),
    group=st.integers(1, 3),
    budget_pages=st.integers(2, 5),
    decode_tokens=st.integers(1, 40),
    prompt=st.integers(1, 6),
    agg=st.sampled_from(["max", "mean"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_kv_group_picks_its_own_top_pages(
    hkv, group, budget_pages, decode_tokens, prompt, agg, seed
):
    kv = _state(budget_pages, decode_tokens, prompt, head_agg=agg)
    table = kv.table
    retained = list(table.retained)
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.randn(len(retained), hkv * group, generator=gen)
    want = _expected_groups(bounds, retained, table.tail_page, budget_pages, hkv, agg)

    union = kv.select_for_layer(bounds, hkv)

    groups = kv.group_pages if kv.group_pages is not None else [union] * hkv
    assert groups == want
    assert union == kv.pages == sorted(set().union(*want))
    # positions() lists the union; the mask gives each KV head exactly its own pages.
    positions, _ = kv.positions()
    mask = kv.kv_head_mask()
    for g in range(hkv):
        seen = positions if mask is None else positions[mask[:, g]]
        assert seen.tolist() == table.retained_positions(want[g]).tolist()
    assert kv.attended_tokens == max(len(table.retained_positions(w)) for w in want)


@settings(max_examples=60, deadline=None)
@given(
    hkv=st.integers(2, 3),
    group=st.integers(1, 3),
    budget_pages=st.integers(2, 4),
    decode_tokens=st.integers(9, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_selection_is_one_set_for_every_head(hkv, group, budget_pages, decode_tokens, seed):
    kv = _state(budget_pages, decode_tokens, 3, quest_selection="layer")
    retained = list(kv.table.retained)
    bounds = torch.randn(len(retained), hkv * group, generator=torch.Generator().manual_seed(seed))
    # All query heads as one group: the head-aggregated selection of before.
    want = _expected_groups(bounds, retained, kv.table.tail_page, budget_pages, 1, "max")[0]
    assert kv.select_for_layer(bounds, hkv) == want
    assert kv.group_pages is None and kv.kv_head_mask() is None


@settings(max_examples=60, deadline=None)
@given(
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_attention_equals_each_head_on_its_own_tokens(hkv, group, n, seed):
    """attend_one with a KV-head mask = per KV head, attention over its tokens only."""
    gen = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(hkv * group, d, generator=gen)
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, d, generator=gen)
    mask = torch.rand(n, hkv, generator=gen) < 0.6
    mask[0] = True  # every head sees a token (the prompt, in the engine)
    out, _ = attend_one(q, k, v, 0.3, mask)
    for h in range(hkv * group):
        g = h // group
        rows = mask[:, g].nonzero().squeeze(1)
        p = torch.softmax((k[rows, g] @ q[h]) * 0.3, dim=0)
        torch.testing.assert_close(out[h], p @ v[rows, g], rtol=1e-5, atol=1e-5)
    # The batched form reads the mask per request: two requests, one unmasked.
    slots = torch.arange(n, dtype=torch.int64)
    both, _ = sparse_decode(
        torch.stack([q, q]),
        k,
        v,
        torch.tensor([0, n, 2 * n]),
        torch.cat([slots, slots]),
        0.3,
        kv_head_mask=torch.cat([mask, torch.ones_like(mask)]),
    )
    torch.testing.assert_close(both[0], out)
    torch.testing.assert_close(both[1], attend_one(q, k, v, 0.3)[0])


def test_reference_per_group_differs_from_layer_and_equals_it_with_one_kv_head():
    """On a tiny random GQA model: per-group quest attends the same number of tokens
    per head as the layer variant, changes the output, and with one KV head per group
    containing every query head (num_kv_heads = 1) equals it exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raas_backend.reference import PolicyRunner

    def model(kv_heads: int):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
        )
        return LlamaForCausalLM(cfg).float()

    prompt = [1, 5, 9, 13, 2, 7]
    forced = [(i * 7) % 61 + 2 for i in range(60)]
    layer = KVPolicyConfig(name="quest", budget_tokens=8, page_size=4, quest_selection="layer")
    group = KVPolicyConfig(name="quest", budget_tokens=8, page_size=4)
    gqa = PolicyRunner(model(3))
    a = gqa.teacher_force(prompt, forced, layer)
    b = gqa.teacher_force(prompt, forced, group)
    assert any(not torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    mqa = PolicyRunner(model(1))
    c = mqa.teacher_force(prompt, forced, layer)
    d = mqa.teacher_force(prompt, forced, group)
    assert all(torch.equal(x, y) for x, y in zip(c.logits, d.logits, strict=True))
