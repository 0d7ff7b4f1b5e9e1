"""Tensor parallelism: two ranks, each holding half the heads, evict the same pages.

Each rank folds only its heads' page mass; `PendingScores.fold` reduces the step's
accumulators over the group before handing scores to the requests. With a two-process
gloo group on the CPU, both ranks must end with identical scores, equal to one process
folding all heads, for the exact aggregations (head max with layer max, head mean with
layer mean), and both ranks' policies must then choose the same victims; with the
batched device state (`RowPolicyState`, the GPU default) both ranks free the same slots.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raas_backend.kernels.row_policy_state import RowPolicyState
from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.row_plan import RowPlan
from raas_backend.sglang_plugin.step_scores import PendingScores, StepScores

HEADS, LAYERS, STEPS = 8, 3, 40
AGGS = (("max", "max"), ("mean", "mean"))


def _states() -> list[RequestKV]:
    out = []
    for head_agg, layer_agg in AGGS:
        cfg = KVPolicyConfig(budget_tokens=48, head_agg=head_agg, layer_agg=layer_agg, alpha=0.1)
        out.append(RequestKV(cfg, prompt_len=4))
    return out


def _join_group(rank: int, world: int, port: int):
    """Join the two-rank gloo group; returns all_reduce(tensor, op) over it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}

    def all_reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=ops[op])

    return all_reduce


def _run(rank: int, world: int, port: int, out: dict) -> None:
    all_reduce = _join_group(rank, world, port)

    states, whole = _states(), _states()
    gen = torch.Generator().manual_seed(7)
    scores = StepScores(64, HEADS // world, "cpu", tp_size=world)
    for _ in range(STEPS):
        for s in (*states, *whole):
            s.begin_step()
        indptr = [0]
        for s in states:
            indptr.append(indptr[-1] + len(s.pages))
        scores.begin_step()
        for _layer in range(LAYERS):
            # Every rank draws the full mass (same seed) and keeps its own heads.
            mass = torch.rand(indptr[-1], HEADS, generator=gen) ** 4
            mine = mass[:, rank * HEADS // world : (rank + 1) * HEADS // world]
            scores.mass[: indptr[-1]].copy_(mine)
            scores.add_layer(indptr[-1])
            for b, s in enumerate(whole):
                s.add_layer_mass(mass[indptr[b] : indptr[b + 1]])
        PendingScores(
            acc=scores.acc,
            num_pages=indptr[-1],
            layers=LAYERS,
            page_indptr=indptr,
            states=states,
            tp_size=world,
            all_reduce=all_reduce,
        ).fold(lambda _s: True)
        for a, b in zip(states, whole, strict=True):
            torch.testing.assert_close(a._acc, b._acc, rtol=1e-5, atol=1e-6)
    out[rank] = [list(s.table.retained) for s in states]
    dist.destroy_process_group()


def _run_device(rank: int, world: int, port: int, out: dict) -> None:
    """The device-state mode: each rank folds its reduced accumulators into its own
    `RowPolicyState` and frees slots from it."""
    all_reduce = _join_group(rank, world, port)

    configs = [
        KVPolicyConfig(budget_tokens=48, head_agg=h, layer_agg=la, alpha=0.1) for h, la in AGGS
    ]
    rows = [1, 2]
    rtt = torch.arange(3 * 1024, dtype=torch.int32).reshape(3, 1024) + 1
    state = RowPolicyState(3, capacity=6, page_size=16, device="cpu")
    plans = [RowPlan(c, prompt_len=4) for c in configs]
    state.start(rows, configs, [4, 4])
    gen = torch.Generator().manual_seed(7)
    scores = StepScores(64, HEADS // world, "cpu", tp_size=world)
    freed: list[int] = []
    pending = None
    for _ in range(4 * STEPS):  # past the budget: pages get evicted
        if pending is not None:
            pending.fold(lambda _s: True, state)
        victims = [p.begin_step() for p in plans]
        freed += state.step(rows, victims, [p.held_pages for p in plans], rtt).tolist()
        state.check()
        indptr = [0]
        for p in plans:
            indptr.append(indptr[-1] + p.scored_pages)
        scores.begin_step()
        for _layer in range(LAYERS):
            mass = torch.rand(indptr[-1], HEADS, generator=gen) ** 4
            mine = mass[:, rank * HEADS // world : (rank + 1) * HEADS // world]
            scores.mass[: indptr[-1]].copy_(mine)
            scores.add_layer(indptr[-1])
        pending = PendingScores(
            acc=scores.acc,
            num_pages=indptr[-1],
            layers=LAYERS,
            page_indptr=indptr,
            states=plans,
            tp_size=world,
            all_reduce=all_reduce,
            rows=rows,
        )
    out[rank] = (freed, [state.held(r) for r in rows])
    dist.destroy_process_group()


def _spawn(target) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(target, args=(2, port, out), nprocs=2, join=True)
        return dict(out)


def test_tp_ranks_reduce_to_the_same_scores_and_victims() -> None:
    out = _spawn(_run)
    assert out[0] == out[1]
    assert all(len(pages) <= 48 // 16 + 1 for pages in out[0])


def test_tp_ranks_free_the_same_slots_from_the_device_state() -> None:
    out = _spawn(_run_device)
    assert out[0] == out[1]
    freed, held = out[0]
    assert freed and all(len(pages) <= 48 // 16 + 1 for pages in held)
