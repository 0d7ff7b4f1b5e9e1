"""Quest: keep everything, attend to the pages whose key bound is highest."""

from __future__ import annotations

import torch

from raas_backend.policies.base import KVPolicy


class QuestPolicy(KVPolicy):
    """Quest (Tang et al., ICML 2024), at the granularity of one selection per step.

    Every page is kept (O(N) memory). Each step attends the prompt, the tail page and
    the `budget_tokens // page_size - 1` other decode pages with the highest upper bound
    on q.k, `sum_d max(q_d * kmax_d, q_d * kmin_d)` (computed by the kernel from
    per-page key min/max; aggregated over heads and layers by the engine before it
    reaches `attended_pages`). O(L) time, O(N) memory.

    Parameters
    ----------
    budget_tokens : decode tokens attended per step.
    """

    name = "quest"
    frees_memory = False
    needs_scores = False

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        return None

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        return []

    def _select(self, page_bounds: torch.Tensor | None) -> list[int]:
        retained = self.table.retained
        keep = self.config.budget_pages
        if len(retained) <= keep:
            return list(retained)
        if page_bounds is None:
            raise ValueError("quest needs page bounds to select pages beyond its budget")
        if page_bounds.numel() != len(retained):
            raise ValueError(f"expected {len(retained)} page bounds, got {page_bounds.numel()}")
        tail = self.table.tail_page
        bounds = page_bounds.to(torch.float32).clone()
        bounds[retained.index(tail)] = float("inf")
        top = torch.topk(bounds, keep).indices.tolist()
        return sorted(retained[i] for i in top)
