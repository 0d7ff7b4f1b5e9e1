"""Page scores of one decode step: accumulated on the device, folded into the requests once.

Each layer's attention yields every scored page's mass per query head. A request's
policy wants one score per page and step, aggregated over heads (max or mean) and over
layers (max or mean), and requests in one batch may choose differently. So each layer
folds its mass into four static accumulators, one per (head, layer) aggregation, with
static shapes (CUDA-graph safe: no host reads, no allocation). After the step the host
reads the pages it listed, once, and hands each request its row of the accumulator its
configuration names (`RequestKV.add_step_scores`), or, for the requests the batched
device state serves, folds them there without reading anything back
(`RowPolicyState.fold_scores`).

With tensor parallelism each rank holds only its heads: the accumulators are reduced
across the group (max for head-max, sum of per-rank means for head-mean) before the
read, so every rank sees the same scores and evicts the same slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raas_backend.kernels.row_policy_state import AGG_ROWS, RowPolicyState
from raas_backend.request_kv import RequestKV
from raas_backend.row_plan import RowPlan

__all__ = ["AGG_ROWS", "PendingScores", "StepScores"]

# all_reduce(tensor, op) over the tensor-parallel group; op is "max" or "sum".
AllReduce = Callable[[torch.Tensor, str], None]


class StepScores:
    """Static per-step page-score buffers for up to `max_pages` scored pages.

    mass: shape [max_pages, num_qo_heads], float32: one layer's page mass (scratch).
    acc: shape [4, max_pages], float32: the step's accumulators (rows: AGG_ROWS).
    """

    def __init__(
        self, max_pages: int, num_qo_heads: int, device: torch.device | str, tp_size: int = 1
    ) -> None:
        self.max_pages = max(1, max_pages)
        self.tp_size = tp_size
        self.mass = torch.zeros(self.max_pages, num_qo_heads, dtype=torch.float32, device=device)
        self.acc = torch.zeros(4, self.max_pages, dtype=torch.float32, device=device)
        self.layers = 0

    def begin_step(self, limit: int | None = None) -> None:
        """Zero the accumulators' first `limit` columns (all: None); recorded inside a
        CUDA graph when called there."""
        self.acc[:, :limit].zero_()

    def add_layer(self, limit: int) -> None:
        """Fold one layer's mass (`self.mass`, its first `limit` rows: a static bound on
        the step's pages; rows past the step's pages are ignored later) into the
        accumulators."""
        mass = self.mass[:limit]
        acc = self.acc[:, :limit]
        head_max = mass.amax(dim=1)
        head_mean = mass.mean(dim=1)
        torch.maximum(acc[0], head_max, out=acc[0])
        acc[1].add_(head_max)
        torch.maximum(acc[2], head_mean, out=acc[2])
        acc[3].add_(head_mean)


@dataclass
class PendingScores:
    """A finished forward's scores, waiting for the next step's bookkeeping."""

    acc: torch.Tensor
    num_pages: int
    layers: int
    page_indptr: list[int]
    states: list[RequestKV | RowPlan | None]
    tp_size: int = 1
    all_reduce: AllReduce | None = None
    #: The forward's rows, in batch order (the device state is indexed by row).
    rows: list[int] | None = None

    def fold(
        self,
        still_running: Callable[[RequestKV | RowPlan], bool],
        device_state: RowPolicyState | None = None,
    ) -> None:
        """Hand each request its scores: into the device state for the requests it
        serves (no read back), by one host read for the per-request states.

        still_running: whether a state is still the live state of its row (a request
        that finished or was retracted since the forward gets nothing).
        """
        if self.num_pages == 0:
            return
        acc = self.acc[:, : self.num_pages]
        if self.all_reduce is not None and self.tp_size > 1:
            acc = acc.clone()
            self.all_reduce(acc[0:2], "max")
            # Per-rank head means average to the mean over all heads.
            self.all_reduce(acc[2:4], "sum")
            acc[2:4] /= self.tp_size
        scored = [
            b
            for b, state in enumerate(self.states)
            if state is not None and state.needs_scores and still_running(state)
        ]
        on_device = [b for b in scored if isinstance(self.states[b], RowPlan)]
        if on_device:
            if device_state is None or self.rows is None:
                raise RuntimeError("raas: device-state scores without the device state")
            device_state.fold_scores(
                [self.rows[b] for b in on_device],
                [self.page_indptr[b] for b in on_device],
                [self.page_indptr[b + 1] - self.page_indptr[b] for b in on_device],
                acc,
                self.layers,
            )
        on_host = [b for b in scored if not isinstance(self.states[b], RowPlan)]
        if not on_host:
            return
        host = acc.float().cpu()
        for b in on_host:
            state = self.states[b]
            lo, hi = self.page_indptr[b], self.page_indptr[b + 1]
            row = AGG_ROWS[(state.config.head_agg, state.config.layer_agg)]
            state.add_step_scores(host[row, lo:hi], self.layers)
