"""The decode step's lists and scores as the CUDA backend builds them, checked on the CPU.

`step_lists` turns the requests' page tables into segments on the host and slots on the
device; `step_scores` accumulates page masses for all aggregations at once and folds a
whole step into each request. Both must equal what the per-request specification
(`RequestKV.positions`, `RequestKV.add_layer_scores`) does, for every policy and for
mixed batches, step after step. The same functions run on CUDA; only the device differs.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV, head_aggregate
from raas_backend.sglang_plugin.step_lists import build_step_lists, expand_segments
from raas_backend.sglang_plugin.step_scores import AGG_ROWS, PendingScores, StepScores

PAGE = 16
POLICIES = ("raas", "dense", "streaming", "h2o")

policy_st = st.fixed_dictionaries(
    {
        "name": st.sampled_from(POLICIES),
        "budget_tokens": st.sampled_from([32, 48, 64, 100]),
        "head_agg": st.sampled_from(["max", "mean"]),
        "layer_agg": st.sampled_from(["max", "mean"]),
    }
)


def _config(d: dict) -> KVPolicyConfig:
    recent = min(16, d["budget_tokens"] - PAGE)
    return KVPolicyConfig(page_size=PAGE, recent_tokens=recent, **d)


def _reference(rtt: torch.Tensor, row: int, state: RequestKV | None, seq_len: int):
    if state is None:
        pos = torch.arange(seq_len)
        return rtt[row, pos].tolist(), [-1] * seq_len
    pos, pages = state.positions()
    return rtt[row, pos].tolist(), pages.tolist()


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(st.tuples(policy_st, st.integers(0, 40), st.booleans()), min_size=1, max_size=6),
    steps=st.integers(1, 120),
    seed=st.integers(0, 2**16),
)
def test_lists_equal_the_per_request_positions(specs, steps, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = len(specs)
    max_context = 40 + steps + 2
    rtt = torch.randperm(batch * max_context * 2, generator=gen)[: batch * max_context]
    rtt = rtt.view(batch, max_context).to(torch.int32) + 1
    states: list[RequestKV | None] = []
    for d, prompt, tracked in specs:
        states.append(RequestKV(_config(d), prompt_len=prompt) if tracked else None)
    lengths = [prompt for _, prompt, _ in specs]
    for _step in range(steps):
        for b, state in enumerate(states):
            lengths[b] += 1
            if state is not None:
                state.begin_step()
                # Random page scores so raas/h2o keep and evict differently each step.
                n = len(state.pages)
                state.add_layer_scores(torch.rand(n, generator=gen) ** 3)
    rows = list(range(batch))
    lists = build_step_lists(rows, lengths, states)
    slots, token_page = expand_segments(lists, rtt)
    assert slots.dtype == torch.int32
    indptr = lists.kv_indptr.tolist()
    page_indptr = lists.page_indptr.tolist()
    for b, state in enumerate(states):
        want_slots, want_pages = _reference(rtt, b, state, lengths[b])
        assert slots[indptr[b] : indptr[b + 1]].tolist() == want_slots
        got_pages = token_page[indptr[b] : indptr[b + 1]].tolist()
        scored = state is not None and state.needs_scores
        if scored:
            # Global page ids: the request's first page id plus its page index.
            want = [p if p < 0 else p + page_indptr[b] for p in want_pages]
            assert got_pages == want
            assert lists.scored_start[b] == state.table.prompt_len
            assert page_indptr[b + 1] - page_indptr[b] == len(state.pages)
            # The page-mass kernels' layout: whole pages, the last may be shorter.
            lens = [want_pages.count(i) for i in range(len(state.pages))]
            assert all(n == PAGE for n in lens[:-1]) and 0 < lens[-1] <= PAGE
        else:
            assert set(got_pages) <= {-1}
            assert page_indptr[b + 1] == page_indptr[b]


def test_lists_fill_a_static_buffer_in_place() -> None:
    rtt = torch.arange(1, 3 * 200 + 1, dtype=torch.int32).view(3, 200)
    state = RequestKV(
        _config({"name": "raas", "budget_tokens": 32, "head_agg": "max", "layer_agg": "max"}),
        prompt_len=5,
    )
    for _ in range(70):
        state.begin_step()
    lists = build_step_lists([2, 0], [75, 9], [state, None])
    buf = torch.full((500,), -7, dtype=torch.int32)
    slots, _ = expand_segments(lists, rtt, out=buf)
    assert slots.data_ptr() == buf.data_ptr()
    assert buf[lists.total_tokens :].eq(-7).all()
    assert slots[-9:].tolist() == rtt[0, :9].tolist()


def test_lists_reject_a_length_the_engine_disagrees_with() -> None:
    state = RequestKV(
        _config({"name": "raas", "budget_tokens": 32, "head_agg": "max", "layer_agg": "max"}),
        prompt_len=5,
    )
    state.begin_step()
    try:
        build_step_lists([0], [99], [state])
    except RuntimeError as exc:
        assert "99" in str(exc)
    else:
        raise AssertionError("a length mismatch must not be attended silently")


@settings(max_examples=20, deadline=None)
@given(
    aggs=st.lists(
        st.tuples(st.sampled_from(["max", "mean"]), st.sampled_from(["max", "mean"])),
        min_size=1,
        max_size=5,
    ),
    layers=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_step_scores_fold_equals_per_layer_scores(aggs, layers, seed) -> None:
    """One fold of the static accumulators == `layers` calls of add_layer_scores."""
    gen = torch.Generator().manual_seed(seed)
    heads = 4
    specs, ref_states, dev_states = [], [], []
    for head_agg, layer_agg in aggs:
        cfg = _config(
            {"name": "raas", "budget_tokens": 64, "head_agg": head_agg, "layer_agg": layer_agg}
        )
        a, b = RequestKV(cfg, prompt_len=3), RequestKV(cfg, prompt_len=3)
        for _ in range(int(torch.randint(1, 90, (1,), generator=gen))):
            a.begin_step()
            b.begin_step()
        ref_states.append(a)
        dev_states.append(b)
        specs.append(len(a.pages))
    page_indptr = [0]
    for n in specs:
        page_indptr.append(page_indptr[-1] + n)
    limit = page_indptr[-1] + 5
    scores = StepScores(limit + 10, heads, "cpu")
    scores.begin_step()
    for _layer in range(layers):
        mass = torch.rand(limit, heads, generator=gen)
        scores.mass[:limit].copy_(mass)
        scores.add_layer(limit)
        for b, state in enumerate(ref_states):
            lo, hi = page_indptr[b], page_indptr[b + 1]
            state.add_layer_mass(mass[lo:hi])
    PendingScores(
        acc=scores.acc,
        num_pages=page_indptr[-1],
        layers=layers,
        page_indptr=page_indptr,
        states=list(dev_states),
    ).fold(lambda _s: True)
    for ref, dev in zip(ref_states, dev_states, strict=True):
        torch.testing.assert_close(dev._finish_scores(), ref._finish_scores())


def test_fold_skips_requests_that_left() -> None:
    cfg = _config({"name": "raas", "budget_tokens": 64, "head_agg": "max", "layer_agg": "max"})
    gone, live = RequestKV(cfg, prompt_len=0), RequestKV(cfg, prompt_len=0)
    for s in (gone, live):
        s.begin_step()
    scores = StepScores(8, 2, "cpu")
    scores.begin_step()
    scores.mass[:2] = torch.tensor([[0.5, 0.1], [0.7, 0.9]])
    scores.add_layer(2)
    PendingScores(
        acc=scores.acc, num_pages=2, layers=1, page_indptr=[0, 1, 2], states=[gone, live]
    ).fold(lambda s: s is live)
    assert gone._acc is None
    torch.testing.assert_close(live._acc, head_aggregate(torch.tensor([[0.7, 0.9]]), "max"))
    assert AGG_ROWS[("max", "max")] == 0


def test_device_side_step_work_reads_nothing_back() -> None:
    """The no-sync contract: what runs on the device each step (list expansion into a
    static buffer, score accumulation) works on meta tensors, which hold no data, so any
    read back to the host (`item`, `tolist`, `bool`, `nonzero`, a data-dependent
    shape) would raise. Only the host-side lists are real."""
    state = RequestKV(
        _config({"name": "raas", "budget_tokens": 32, "head_agg": "max", "layer_agg": "max"}),
        prompt_len=5,
    )
    for _ in range(70):
        state.begin_step()
    lists = build_step_lists([1, 0], [75, 9], [state, None])
    rtt = torch.empty(3, 200, dtype=torch.int32, device="meta")
    static = torch.empty(500, dtype=torch.int32, device="meta")
    slots, token_page = expand_segments(lists, rtt, out=static)
    assert slots.shape == token_page.shape == (lists.total_tokens,)
    scores = StepScores(64, 4, "meta")
    scores.begin_step()
    scores.add_layer(2 * 8)
    assert scores.acc.device.type == "meta"
