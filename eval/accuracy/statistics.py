"""Accuracy intervals and the paired comparison of a policy against dense."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z_95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: unlike the normal approximation it
    stays inside [0, 1] and is usable at 0 or n successes, the usual case on small sets."""
    if total <= 0:
        return (0.0, 1.0)
    if not 0 <= correct <= total:
        raise ValueError(f"expected 0 <= correct <= total, got {correct} of {total}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs: the probability, if the policy
    changed nothing but noise, of a split at least this uneven."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A policy against dense on the problems both answered (an error on either side
    leaves the problem out of the pair)."""

    pairs: int
    both_correct: int
    both_wrong: int
    lost: list[str]  # dense right, policy wrong
    gained: list[str]  # dense wrong, policy right
    mcnemar_p: float

    @property
    def accuracy_delta(self) -> float:
        return (len(self.gained) - len(self.lost)) / self.pairs if self.pairs else 0.0


def paired_against(dense: Mapping[str, bool], policy: Mapping[str, bool]) -> Paired:
    common = sorted(dense.keys() & policy.keys())
    lost = [p for p in common if dense[p] and not policy[p]]
    gained = [p for p in common if policy[p] and not dense[p]]
    both_correct = sum(1 for p in common if dense[p] and policy[p])
    return Paired(
        pairs=len(common),
        both_correct=both_correct,
        both_wrong=len(common) - both_correct - len(lost) - len(gained),
        lost=lost,
        gained=gained,
        mcnemar_p=mcnemar_exact_p(len(lost), len(gained)),
    )
