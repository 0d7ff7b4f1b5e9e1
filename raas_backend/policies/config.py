"""The per-request KV policy configuration (what `custom_params.kv_policy` carries).

Names, ranges, defaults and error texts are the specification's (raas_backend/policy_spec.py),
the one the gateway checks requests against; the engine checks them again here, since a
request may reach SGLang without the gateway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from raas_backend import policy_spec as spec
from raas_backend.policy_spec import (
    AGGREGATIONS,
    DEFAULT_ALPHA,
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_HEAD_AGG,
    DEFAULT_LAYER_AGG,
    DEFAULT_PAGE_SIZE,
    DEFAULT_RECENT_TOKENS,
    DEFAULT_REFRESH_TOP_FRACTION,
    MIN_BUDGET_PAGES,
    POLICY_NAMES,
    Aggregation,
)

# Importable from here as before, where the engine's modules and the studies read them.
__all__ = [
    "AGGREGATIONS",
    "DEFAULT_ALPHA",
    "DEFAULT_BUDGET_TOKENS",
    "DEFAULT_HEAD_AGG",
    "DEFAULT_LAYER_AGG",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_RECENT_TOKENS",
    "DEFAULT_REFRESH_TOP_FRACTION",
    "MIN_BUDGET_PAGES",
    "POLICY_NAMES",
    "Aggregation",
    "KVPolicyConfig",
    "PolicyConfigError",
]


class PolicyConfigError(ValueError):
    """A kv_policy value is out of range; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(spec.message(field, message))
        self.field = field


@dataclass(frozen=True)
class KVPolicyConfig:
    """How one request's KV cache is kept.

    Parameters
    ----------
    name : one of raas, dense, streaming, h2o, quest.
    budget_tokens : decode tokens kept (raas/streaming/h2o) or attended (quest); the
        prompt is always kept. Ignored by dense.
    alpha : raas only; a page is "used" at a step when its aggregated attention mass
        exceeds alpha.
    head_agg, layer_agg : how per-head and per-layer page masses combine into one score
        per page and step (one slot serves every head and layer).
    refresh_top_fraction : raas only; if > 0, the paper's adaptive variant: the top
        fraction of pages by mass is also marked used at each step.
    quest_selection : quest only; ``kv_group`` (default, the paper's): every KV head
        attends its own top pages, ranked by the bound aggregated (``head_agg``) over the
        query heads of its GQA group; ``layer``: one page set per layer, ranked by the
        bound aggregated over all query heads.
    recent_tokens : h2o only; the most recent decode tokens are protected from eviction.
    page_size : tokens per logical page (an engine setting, not a per-request one).
    """

    name: str = "raas"
    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    alpha: float = DEFAULT_ALPHA
    head_agg: Aggregation = DEFAULT_HEAD_AGG
    layer_agg: Aggregation = DEFAULT_LAYER_AGG
    refresh_top_fraction: float = DEFAULT_REFRESH_TOP_FRACTION
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    quest_selection: spec.QuestSelection = spec.DEFAULT_QUEST_SELECTION
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        if problem := spec.name_problem(self.name):
            raise PolicyConfigError("name", problem)
        if not spec.is_int(self.page_size) or self.page_size < 1:
            raise PolicyConfigError(
                "page_size", f"expected an integer >= 1, got {self.page_size!r}"
            )
        low = spec.min_budget_tokens(self.page_size)
        if problem := spec.budget_problem(self.budget_tokens, low):
            pages = f"{MIN_BUDGET_PAGES} pages of {self.page_size}"
            raise PolicyConfigError("budget_tokens", f"{problem} ({pages})")
        if problem := spec.alpha_problem(self.alpha):
            raise PolicyConfigError("alpha", problem)
        for agg_field in ("head_agg", "layer_agg"):
            if problem := spec.aggregation_problem(getattr(self, agg_field)):
                raise PolicyConfigError(agg_field, problem)
        if problem := spec.refresh_top_fraction_problem(self.refresh_top_fraction):
            raise PolicyConfigError("refresh_top_fraction", problem)
        if problem := spec.quest_selection_problem(self.quest_selection):
            raise PolicyConfigError("quest_selection", problem)
        if problem := spec.recent_tokens_problem(self.recent_tokens):
            raise PolicyConfigError("recent_tokens", problem)
        if self.name == "h2o" and (
            problem := spec.h2o_recent_problem(
                self.recent_tokens, self.budget_tokens, self.page_size
            )
        ):
            raise PolicyConfigError("recent_tokens", problem)

    @property
    def budget_pages(self) -> int:
        return self.budget_tokens // self.page_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, defaults: KVPolicyConfig) -> KVPolicyConfig:
        """Overlay a request's kv_policy dict on server defaults; unknown keys are errors."""
        if data is None:
            return defaults
        if not isinstance(data, dict):
            raise PolicyConfigError("", f"expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"page_size"}
        for key in data:
            if key not in known:
                raise PolicyConfigError(str(key), f"unknown field; expected one of {sorted(known)}")
        merged_data = {**asdict(defaults), **data}
        budget, page = merged_data["budget_tokens"], merged_data["page_size"]
        if merged_data["name"] == "h2o" and "recent_tokens" not in data and spec.is_int(budget):
            # A recent window the caller never asked for shrinks to fit a small budget
            # instead of failing the request (one set explicitly is still checked).
            merged_data["recent_tokens"] = max(0, min(merged_data["recent_tokens"], budget - page))
        return cls(**merged_data)
