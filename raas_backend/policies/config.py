"""The per-request KV policy configuration (what `custom_params.kv_policy` carries)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

POLICY_NAMES = ("raas", "dense", "streaming", "h2o", "quest")
Aggregation = Literal["max", "mean"]
AGGREGATIONS = ("max", "mean")

# Defaults chosen by the fidelity study (docs/fidelity.md); overridable per server. The
# adaptive variant: each step the top quarter of pages by attention mass (max over heads,
# max over layers) counts as used; alpha 0.99 leaves the choice to that fraction, which
# does not depend on the model's attention-mass scale as a fixed threshold does.
DEFAULT_ALPHA = 0.99
DEFAULT_HEAD_AGG: Aggregation = "max"
DEFAULT_LAYER_AGG: Aggregation = "max"
DEFAULT_REFRESH_TOP_FRACTION = 0.25
MIN_BUDGET_PAGES = 2


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true must not read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class PolicyConfigError(ValueError):
    """A kv_policy value is out of range; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"kv_policy.{field}: {message}" if field else f"kv_policy: {message}")
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
    recent_tokens : h2o only; the most recent decode tokens are protected from eviction.
    page_size : tokens per logical page (an engine setting, not a per-request one).
    """

    name: str = "raas"
    budget_tokens: int = 1024
    alpha: float = DEFAULT_ALPHA
    head_agg: Aggregation = DEFAULT_HEAD_AGG
    layer_agg: Aggregation = DEFAULT_LAYER_AGG
    refresh_top_fraction: float = DEFAULT_REFRESH_TOP_FRACTION
    recent_tokens: int = 64
    page_size: int = 16

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise PolicyConfigError("name", f"expected one of {POLICY_NAMES}, got {self.name!r}")
        if not _is_int(self.page_size) or self.page_size < 1:
            raise PolicyConfigError(
                "page_size", f"expected an integer >= 1, got {self.page_size!r}"
            )
        if (
            not _is_int(self.budget_tokens)
            or self.budget_tokens < MIN_BUDGET_PAGES * self.page_size
        ):
            raise PolicyConfigError(
                "budget_tokens",
                f"expected an integer >= {MIN_BUDGET_PAGES * self.page_size} "
                f"({MIN_BUDGET_PAGES} pages of {self.page_size}), got {self.budget_tokens!r}",
            )
        if (
            not _is_number(self.alpha)
            or not math.isfinite(self.alpha)
            or not 0.0 <= self.alpha < 1.0
        ):
            raise PolicyConfigError("alpha", f"expected a number in [0, 1), got {self.alpha!r}")
        for agg_field in ("head_agg", "layer_agg"):
            value = getattr(self, agg_field)
            if value not in AGGREGATIONS:
                raise PolicyConfigError(agg_field, f"expected one of {AGGREGATIONS}, got {value!r}")
        if not _is_number(self.refresh_top_fraction) or not (
            0.0 <= self.refresh_top_fraction <= 1.0
        ):
            raise PolicyConfigError(
                "refresh_top_fraction",
                f"expected a number in [0, 1], got {self.refresh_top_fraction!r}",
            )
        if not _is_int(self.recent_tokens) or self.recent_tokens < 0:
            raise PolicyConfigError(
                "recent_tokens", f"expected an integer >= 0, got {self.recent_tokens!r}"
            )
        if self.name == "h2o" and self.recent_tokens > self.budget_tokens - self.page_size:
            raise PolicyConfigError(
                "recent_tokens",
                f"expected at most budget_tokens - page_size = "
                f"{self.budget_tokens - self.page_size}, got {self.recent_tokens}",
            )

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
        if merged_data["name"] == "h2o" and "recent_tokens" not in data and _is_int(budget):
            # A recent window the caller never asked for shrinks to fit a small budget
            # instead of failing the request (one set explicitly is still checked).
            merged_data["recent_tokens"] = max(0, min(merged_data["recent_tokens"], budget - page))
        return cls(**merged_data)
