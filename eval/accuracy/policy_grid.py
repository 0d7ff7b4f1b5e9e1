"""The grid of KV policies and budgets one run sweeps, and what each point sends."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raas_backend import policy_spec

# `dense` keeps everything and `none` sends no extension at all (an endpoint that is not
# ours, or the server's own default): neither takes a budget.
UNBUDGETED = ("dense", "none")
KNOWN_POLICIES = ("dense", "raas", "streaming", "h2o", "quest", "none")
# The gateway's and the engine's floor at the default page size: two pages.
MIN_BUDGET = policy_spec.min_budget_tokens()


@dataclass(frozen=True)
class PolicyPoint:
    name: str
    budget_tokens: int | None = None
    params: tuple[tuple[str, Any], ...] = field(default=())  # extra kv_policy fields

    @property
    def label(self) -> str:
        return self.name if self.budget_tokens is None else f"{self.name}@{self.budget_tokens}"

    def kv_policy(self) -> dict[str, Any] | None:
        """The body of `extra_body={"kv_policy": ...}`; None for `none`."""
        if self.name == "none":
            return None
        body: dict[str, Any] = {"name": self.name}
        if self.budget_tokens is not None:
            body["budget_tokens"] = self.budget_tokens
        body.update(self.params)
        return body


def build_grid(
    policies: Iterable[str],
    budgets: Iterable[int],
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[PolicyPoint]:
    """Every budgeted policy at every budget, plus each unbudgeted one once; the baseline
    (dense, else none) comes first so that a partial run already has its pairs."""
    names = list(dict.fromkeys(policies))
    for name in names:
        if name not in KNOWN_POLICIES:
            raise ValueError(f"expected a policy in {KNOWN_POLICIES}, got {name!r}")
    budget_list = sorted(set(budgets))
    for b in budget_list:
        if b < MIN_BUDGET:
            raise ValueError(f"expected budgets of at least {MIN_BUDGET} tokens, got {b}")
    budgeted = [n for n in names if n not in UNBUDGETED]
    if budgeted and not budget_list:
        raise ValueError(f"policies {budgeted} need at least one budget")
    extra = params or {}
    grid = [
        PolicyPoint(n, None, tuple(sorted(extra.get(n, {}).items())))
        for n in UNBUDGETED
        if n in names
    ]
    for name in budgeted:
        fields = tuple(sorted(extra.get(name, {}).items()))
        grid += [PolicyPoint(name, b, fields) for b in budget_list]
    return grid


def baseline_label(grid: Iterable[PolicyPoint]) -> str | None:
    labels = [p.label for p in grid]
    return next((name for name in UNBUDGETED if name in labels), None)
