"""The milestone observation on dense attention: pages used for a while, then never again.

Input: the per-step page scores of a dense run under the four aggregations
(`BatchResult.recorded_scores`). A page is "used" at a step when its score exceeds
alpha, as raas decides it. For each aggregation and alpha this measures how often pages
are used, how many pages retire (used well after they were written, then never again
until the end), and how much use reaches pages older than a budget window: the use
that raas can serve and a recent window (StreamingLLM) cannot.
"""

from __future__ import annotations

import torch

from eval.batched_runner import AGGREGATIONS
from raas_backend.policies.raas import used_pages

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1)
# A page "used for a while" is still used this many steps after it was written.
ACTIVE_AFTER = 64
# "Never again": not used in this many final steps.
FINAL_STEPS = 256


def score_matrix(recorded: list[torch.Tensor]) -> torch.Tensor:
    """shape [4, steps, pages] float32; NaN where a page did not exist yet, and for the
    tail page (the one being written, which raas never evicts)."""
    steps = len(recorded)
    pages = recorded[-1].shape[1]
    out = torch.full((len(AGGREGATIONS), steps, pages), float("nan"))
    for s, scores in enumerate(recorded):
        n = scores.shape[1]
        out[:, s, : n - 1] = scores[:, : n - 1]
    return out


def used_matrix(scores: torch.Tensor, alpha: float, top_fraction: float = 0.0) -> torch.Tensor:
    """shape [steps, pages] bool from one aggregation's [steps, pages] scores (NaN where a
    page does not exist yet): RaaSPolicy's rule applied to each step's existing pages."""
    if top_fraction == 0.0:
        return scores > alpha  # NaN compares False: a page not written yet is not used
    used = torch.zeros(scores.shape, dtype=torch.bool)
    for step, row in enumerate(scores):
        exists = ~torch.isnan(row)
        used[step, exists] = used_pages(row[exists], alpha, top_fraction)
    return used


def analyse(
    recorded: list[torch.Tensor], page_size: int, window: int
) -> list[dict[str, float | str]]:
    """One row per (aggregation, alpha); `window` is the budget a recent window holds."""
    scores = score_matrix(recorded)
    _, steps, pages = scores.shape
    # Page p is written from decode step p * page_size (its first token).
    birth = torch.arange(pages) * page_size
    step_idx = torch.arange(steps).view(-1, 1)
    age = step_idx - birth.view(1, -1)  # [steps, pages]
    exists = ~torch.isnan(scores[0])
    # Pages old enough that "active after ACTIVE_AFTER" and "unused in the final steps"
    # are both decidable.
    judged = birth + ACTIVE_AFTER < steps - FINAL_STEPS
    rows: list[dict[str, float | str]] = []
    for a, (head, layer) in enumerate(AGGREGATIONS):
        for alpha in ALPHAS:
            used = used_matrix(scores[a], alpha) & exists
            any_used = used.any(dim=0)
            last = torch.where(used, step_idx.expand_as(used), -1).amax(dim=0)
            active_long = last - birth >= ACTIVE_AFTER
            retired = judged & active_long & (last < steps - FINAL_STEPS)
            old_use = used & (age >= window)
            rows.append(
                {
                    "head_agg": head,
                    "layer_agg": layer,
                    "alpha": alpha,
                    "used_fraction": float(used.sum() / exists.sum().clamp_min(1)),
                    "never_used_fraction": float((~any_used[judged]).float().mean())
                    if judged.any()
                    else float("nan"),
                    "retired_fraction": float(retired[judged].float().mean())
                    if judged.any()
                    else float("nan"),
                    "old_use_fraction": float(old_use.sum() / used.sum().clamp_min(1)),
                }
            )
    return rows
