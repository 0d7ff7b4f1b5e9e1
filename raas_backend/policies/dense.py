"""Dense attention: the baseline every sparse policy is measured against."""

from __future__ import annotations

import torch

from raas_backend.policies.base import KVPolicy


class DensePolicy(KVPolicy):
    """Keep and attend to every token; O(N) time and memory per step. No parameters."""

    name = "dense"
    frees_memory = False
    needs_scores = False

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        return None

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        return []
