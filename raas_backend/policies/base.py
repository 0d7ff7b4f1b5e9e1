"""The interface every KV policy implements, and the mechanics they share.

A policy instance belongs to one request. Each decode step the engine (or the
reference) calls, in this order:

1. `update(scores, step)` with the aggregated attention score of every page attended
   at the previous step (`attended_pages()` of that step), one float per page;
2. `on_token(step)` once the new token is accounted in the page table;
3. `victims()` -> pages to evict so that retained decode tokens fit the budget;
4. `attended_pages(...)` -> the decode pages the next step attends (all retained, except
   for quest, which selects by a key bound).

Every per-step operation is O(pages held), never O(sequence).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from raas_backend.paging import PageTable
from raas_backend.policies.config import KVPolicyConfig


class KVPolicy(ABC):
    """Base class: per-request state, page bookkeeping, budget enforcement."""

    name: ClassVar[str]
    #: False for policies that keep every page (dense, quest): memory is O(N).
    frees_memory: ClassVar[bool] = True
    #: True when `update` needs attention scores (the engine skips scoring otherwise).
    needs_scores: ClassVar[bool] = True

    def __init__(self, config: KVPolicyConfig, table: PageTable) -> None:
        if config.page_size != table.page_size:
            raise ValueError(
                f"expected the table's page size {config.page_size}, got {table.page_size}"
            )
        self.config = config
        self.table = table
        self._last_attended: list[int] = []
        # Per-page state, indexed by logical page id, grown as pages open.
        self.created_step: list[int] = []

    # -- step protocol -------------------------------------------------------------

    def update(self, scores: torch.Tensor, step: int) -> None:
        """Record the scores of the pages attended at the previous step.

        scores: shape [len(last attended pages)], dtype float32 (aggregated mass).
        """
        if scores.numel() != len(self._last_attended):
            raise ValueError(
                f"expected {len(self._last_attended)} page scores, got {scores.numel()}"
            )
        if self._last_attended:
            self._record(self._last_attended, scores.to(torch.float32), step)

    def on_token(self, step: int) -> None:
        """Account one decode token in the table (opening a page when needed)."""
        if self.table.append_token():
            self.created_step.append(step)
            self._on_new_page(self.table.num_pages - 1, step)

    def victims(self) -> list[int]:
        """Pages to evict so retained decode tokens fit the budget (never the tail)."""
        if not self.frees_memory:
            return []
        excess = self.table.retained_decode_tokens - self.config.budget_tokens
        if excess <= 0:
            return []
        tail = self.table.tail_page
        candidates = [p for p in self.table.retained if p != tail]
        chosen: list[int] = []
        freed = 0
        for page in self._eviction_order(candidates):
            if freed >= excess:
                break
            chosen.append(page)
            freed += self.table.page_tokens(page)
        return chosen

    def attended_pages(self, page_bounds: torch.Tensor | None = None) -> list[int]:
        """Decode pages the next step attends; remembered for the next `update`."""
        self._last_attended = self._select(page_bounds)
        return self._last_attended

    # -- what a policy defines -----------------------------------------------------

    def _on_new_page(self, page: int, step: int) -> None:  # noqa: B027 - optional hook
        """Initialise per-page state for a page opened at `step`."""

    @abstractmethod
    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        """Fold one step's scores into per-page state."""

    @abstractmethod
    def _eviction_order(self, candidates: list[int]) -> list[int]:
        """Candidates (retained, non-tail, ascending ids) sorted first-to-evict first."""

    def _select(self, page_bounds: torch.Tensor | None) -> list[int]:
        return list(self.table.retained)

    # -- reporting -----------------------------------------------------------------

    def stats(self) -> dict[str, int | str | float]:
        t = self.table
        return {
            "policy": self.name,
            "budget_tokens": self.config.budget_tokens,
            "alpha": self.config.alpha,
            "retained_tokens": t.retained_tokens,
            "peak_retained_tokens": t.peak_retained_tokens,
            "dense_equivalent_tokens": t.dense_equivalent_tokens(),
            "evicted_pages": t.evicted_pages,
        }
