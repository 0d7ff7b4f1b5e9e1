"""Quest: keep everything, attend to the pages whose key bound is highest."""

from __future__ import annotations

import torch

from raas_backend.policies.base import KVPolicy


class QuestPolicy(KVPolicy):
    """Quest (Tang et al., ICML 2024): query-aware page selection, per KV head.

    Every page is kept (O(N) memory). At each layer and step, every KV head attends the
    prompt, the tail page and the `budget_tokens // page_size - 1` other decode pages
    with the highest upper bound on q.k, `sum_d max(q_d * kmax_d, q_d * kmin_d)`
    (computed from per-page key min/max). Under GQA one KV head serves a group of query
    heads; its bound is the group's, aggregated by `head_agg` (`attended_pages_per_group`,
    config `quest_selection="kv_group"`, the paper's). With `quest_selection="layer"` one
    page set serves every head of the layer, ranked by the bound aggregated over all
    query heads (`attended_pages`). O(L) time, O(N) memory.

    Parameters
    ----------
    budget_tokens : decode tokens each KV head attends per step.
    quest_selection : ``kv_group`` or ``layer`` (see above).
    """

    name = "quest"
    frees_memory = False
    needs_scores = False

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        return None

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        return []

    def attended_pages_per_group(self, group_bounds: torch.Tensor) -> list[list[int]]:
        """Each KV head's pages for this layer: one top-budget selection per column.

        group_bounds: shape [len(retained), num_kv_heads] float32, the bound of each
        retained page aggregated over the query heads of each KV head's group.
        Returns one ascending page list per KV head; the union is remembered as the
        attended pages (quest takes no scores, so only its length matters to `update`).
        """
        if group_bounds.dim() != 2:
            raise ValueError(
                f"expected bounds of shape [pages, kv_heads], got {tuple(group_bounds.shape)}"
            )
        groups = [self._select(group_bounds[:, g]) for g in range(group_bounds.shape[1])]
        self._last_attended = sorted(set().union(*groups)) if groups else []
        return groups

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
