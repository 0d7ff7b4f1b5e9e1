"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

import torch

from raas_backend.policies.base import KVPolicy


class StreamingPolicy(KVPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024).

    The sinks are the prompt, which every policy here keeps; the window is the most
    recent `budget_tokens` decode tokens, so the oldest decode page goes first.
    Attention scores are not needed.

    Parameters
    ----------
    budget_tokens : size of the recent window (config.budget_tokens).
    """

    name = "streaming"
    needs_scores = False

    def _record(self, pages: list[int], scores: torch.Tensor, step: int) -> None:
        return None

    def _eviction_order(self, candidates: list[int]) -> list[int]:
        return sorted(candidates)
