"""H2O: keep the heavy hitters by cumulative attention mass."""

from __future__ import annotations

import torch

from raas_backend.policies.base import KVPolicy


class H2OPolicy(KVPolicy):
    """Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023), at page granularity.

    Each page accumulates its aggregated attention mass over all steps it was attended.
    Pages inside the most recent `recent_tokens` decode tokens are protected; among the
    rest, the page with the lowest cumulative mass goes first (ties: the oldest page).

    Parameters
    ----------
    budget_tokens : decode tokens kept.
    recent_tokens : recent window protected from eviction.
    """

    name = "h2o"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cum_mass: list[float] = []

    def _on_new_page(self, page: int, step: int) -> None:
        self.cum_mass.append(0.0)

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        for page, score in zip(pages, scores.tolist(), strict=True):
            self.cum_mass[page] += score

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        protected_from = self.table.decode_len - self.config.recent_tokens
        page_size = self.table.page_size
        # A page is protected if any of its tokens is inside the recent window.
        old = [p for p in candidates if (p + 1) * page_size <= protected_from]
        return sorted(old, key=lambda p: (self.cum_mass[p], p))
