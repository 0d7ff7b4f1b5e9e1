"""RaaS: evict the page that has gone unused longest."""

from __future__ import annotations

import math

import torch

from raas_backend.policies.base import KVPolicy


def used_pages(scores: torch.Tensor, alpha: float, top_fraction: float) -> torch.Tensor:
    """Which pages count as used at one step: shape [pages] bool from their scores.

    Above alpha, or (the adaptive variant, top_fraction > 0) among the top
    ceil(top_fraction * pages) by score, at least one; a page with zero mass never is.
    """
    used = scores > alpha
    if top_fraction > 0.0 and scores.numel():
        # The tolerance keeps e.g. 0.07 * 100 = 7.000000000000001 at 7 pages.
        k = max(1, math.ceil(top_fraction * scores.numel() - 1e-9))
        top = torch.topk(scores, k).indices
        # A page no head attended at all was not used, whatever its rank among ties.
        used[top[scores[top] > 0]] = True
    return used


class RaaSPolicy(KVPolicy):
    """Reasoning-Aware Attention Sparsity (Hu et al., Findings of ACL 2025).

    Each decode page carries `last_used`, the latest step at which its aggregated
    attention mass exceeded alpha (a new page starts at its creation step). Once
    retained decode tokens exceed the budget, the page with the oldest `last_used`
    goes first (ties: the oldest page). Milestone pages that keep being attended
    survive; pages that stop being attended age out.

    Parameters
    ----------
    alpha : mass threshold for "used" (config.alpha).
    refresh_top_fraction : adaptive variant; the top fraction of attended pages by mass
        is also refreshed each step, whatever alpha says (pages with zero mass never are).
    """

    name = "raas"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_used: list[int] = []

    def _on_new_page(self, page: int, step: int) -> None:
        self.last_used.append(step)

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        used = used_pages(scores, self.config.alpha, self.config.refresh_top_fraction)
        for i in used.nonzero().flatten().tolist():
            self.last_used[pages[i]] = step

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        return sorted(candidates, key=lambda p: (self.last_used[p], p))
