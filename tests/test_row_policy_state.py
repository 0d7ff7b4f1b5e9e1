"""The batched device policy state equals the per-request policies, step by step.

A mixed batch of raas (with and without the adaptive refresh), streaming, h2o and dense
requests, joining and leaving at random steps (rows reused), runs through both: the
per-request `RequestKV` (the specification) and `RowPolicyState` driven by the host's
`RowPlan` counts, the way the engine drives it. After every step the freed slots, the
held pages, the attention lists, the scored-page layout and the statistics agree, and
the device's own consistency flags stay clear. Scores go through `StepScores`, the
accumulators the decode kernels fill, with every (head, layer) aggregation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.kernels.row_policy_state import RowPolicyState
from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.row_plan import RowPlan
from raas_backend.sglang_plugin.step_scores import StepScores

ROWS, CONTEXT, HEADS, LAYERS = 6, 400, 3, 2


def _slot(row: int, pos: int) -> int:
    return 1 + row * CONTEXT + pos


def _config(draw, page: int) -> KVPolicyConfig:
    name = draw(st.sampled_from(["raas", "raas", "streaming", "h2o", "dense"]))
    budget = draw(st.integers(2, 6)) * page + draw(st.integers(0, page - 1))
    return KVPolicyConfig(
        name=name,
        budget_tokens=budget,
        page_size=page,
        alpha=draw(st.sampled_from([0.0, 0.05, 0.3])),
        refresh_top_fraction=draw(st.sampled_from([0.0, 0.25, 1.0])),
        head_agg=draw(st.sampled_from(["max", "mean"])),
        layer_agg=draw(st.sampled_from(["max", "mean"])),
        recent_tokens=min(draw(st.integers(0, 2 * page)), budget - page),
    )


@st.composite
def scenarios(draw):
    page = draw(st.sampled_from([1, 2, 4]))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        requests.append(
            (
                _config(draw, page),
                draw(st.integers(0, 12)),  # prompt
                draw(st.integers(0, 20)),  # joins at step
                draw(st.integers(1, 70)),  # decode steps
            )
        )
    return page, requests, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_device_state_equals_the_per_request_policies(scenario):
    page, requests, seed = scenario
    gen = torch.Generator().manual_seed(seed)
    rtt = torch.zeros(ROWS, CONTEXT, dtype=torch.int32)
    state = RowPolicyState(ROWS, capacity=6 + 2, page_size=page, device="cpu")
    free_rows = list(range(1, ROWS))  # row 0: the engine's padding row
    waiting = sorted(enumerate(requests), key=lambda item: item[1][2])
    running: dict[int, tuple[int, RequestKV, RowPlan, int]] = {}  # row -> (id, spec, plan, left)
    pending = None  # (rows, starts, counts, acc) of the last forward
    step = 0
    while waiting or running:
        # Arrivals take a free row (prefill writes their prompt's slots).
        while waiting and waiting[0][1][2] <= step and free_rows:
            i, (cfg, prompt, _, steps) = waiting.pop(0)
            row = free_rows.pop(0)
            rtt[row].zero_()
            rtt[row, :prompt] = torch.tensor(
                [_slot(row, p) for p in range(prompt)], dtype=torch.int32
            )
            running[row] = (i, RequestKV(cfg, prompt), RowPlan(cfg, prompt), steps)
            state.start([row], [cfg], [prompt])
        if not running:
            step += 1
            continue
        rows = sorted(running)
        # Fold the last forward's scores for the rows still held by their request.
        if pending is not None:
            p_rows, p_starts, p_counts, acc = pending
            keep = [i for i, r in enumerate(p_rows) if r in running]
            state.fold_scores(
                [p_rows[i] for i in keep],
                [p_starts[i] for i in keep],
                [p_counts[i] for i in keep],
                acc,
                LAYERS,
            )
        victims, held, expected_freed = [], [], []
        for row in rows:
            _, spec, plan, _ = running[row]
            freed = spec.begin_step()
            victims.append(plan.begin_step())
            held.append(plan.held_pages)
            expected_freed.extend(_slot(row, p) for p in freed)
            assert plan.stats() == spec.stats()
            assert plan.listed_tokens == spec.positions()[0].numel()
        freed = state.step(rows, victims, held, rtt)
        state.check()
        assert freed.tolist() == expected_freed
        for row in rows:
            _, spec, plan, _ = running[row]
            # The new token's slot, as the engine allocates it after the eviction.
            rtt[row, plan.seq_len - 1] = _slot(row, plan.seq_len - 1)
            if plan.frees_memory:
                assert state.held(row) == spec.table.retained
        # The step's lists and scored layout against the specification's positions.
        heads = [running[r][2].list_head for r in rows]
        lengths = [running[r][2].listed_tokens for r in rows]
        counts = [running[r][2].scored_pages for r in rows]
        starts = [sum(counts[:i]) for i in range(len(rows))]
        page_starts = [s if c else -1 for s, c in zip(starts, counts, strict=True)]
        slots, token_page = state.build_lists(
            rows, heads, lengths, page_starts, rtt, with_pages=True
        )
        want_slots, want_pages = [], []
        for row, start, count in zip(rows, starts, counts, strict=True):
            spec = running[row][1]
            positions, page_of = spec.positions()
            want_slots.extend(_slot(row, p) for p in positions.tolist())
            want_pages.extend(start + q if q >= 0 and count else -1 for q in page_of.tolist())
            assert count == (len(spec.pages) if spec.needs_scores else 0)
        assert slots.tolist() == want_slots
        assert token_page.tolist() == want_pages
        # The forward: every layer's per-head page mass, into the specification one
        # layer at a time and into the kernels' accumulators.
        total = sum(counts)
        scores = StepScores(max(total, 1), HEADS, "cpu")
        scores.begin_step()
        for _ in range(LAYERS):
            mass = torch.rand(total, HEADS, generator=gen) ** 3
            mass[torch.rand(total, HEADS, generator=gen) < 0.2] = 0.0
            scores.mass[:total] = mass
            scores.add_layer(total)
            for row, start, count in zip(rows, starts, counts, strict=True):
                if count:
                    running[row][1].add_layer_mass(mass[start : start + count])
        pending = (rows, starts, counts, scores.acc.clone())
        # Departures free their row (finish or abort: the rest of the row is the engine's).
        for row in rows:
            i, spec, plan, left = running[row]
            if left <= 1:
                del running[row]
                free_rows.append(row)
            else:
                running[row] = (i, spec, plan, left - 1)
        step += 1


def test_a_victim_slot_already_freed_is_caught():
    """The device check the engine relies on against freeing a slot twice."""
    cfg = KVPolicyConfig(name="streaming", budget_tokens=4, page_size=2)
    state = RowPolicyState(2, capacity=4, page_size=2, device="cpu")
    rtt = torch.zeros(2, 32, dtype=torch.int32)
    plan = RowPlan(cfg, prompt_len=1)
    state.start([1], [cfg], [1])
    for n in range(1, 8):
        v = plan.begin_step()
        if v:
            # Free the oldest page's slots behind the state's back.
            rtt[1, :] = 0
        state.step([1], [v], [plan.held_pages], rtt)
        if v:
            with pytest.raises(RuntimeError, match="already freed"):
                state.check()
            return
        rtt[1, plan.seq_len - 1] = n + 1
    raise AssertionError("streaming at budget 4 evicted nothing in 7 steps")


def test_a_count_the_host_got_wrong_is_caught():
    cfg = KVPolicyConfig(name="raas", budget_tokens=4, page_size=2)
    state = RowPolicyState(2, capacity=4, page_size=2, device="cpu")
    rtt = torch.arange(64, dtype=torch.int32).reshape(2, 32) + 1
    state.start([1], [cfg], [0])
    state.step([1], [0], [1], rtt)
    state.check()
    state.step([1], [1], [1], rtt)  # nothing is over budget after two tokens
    with pytest.raises(RuntimeError, match="differ from the host"):
        state.check()
