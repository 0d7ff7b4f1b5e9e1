"""The KV-policy specification: policy names, request fields, their ranges and defaults,
the minimum budget and the error texts.

One copy for both sides of the HTTP hop: the gateway checks a request's `kv_policy`
against it (service/chat/kv_policy.py, service/server/settings.py, service/api/api_keys.py)
and the engine re-checks what arrives (raas_backend/policies/config.py). It lives in
raas_backend because the engine must never import the gateway; it imports nothing but the
standard library (and raas_backend/__init__.py imports nothing), so the gateway reads it
without loading torch or SGLang.

Each `*_problem` function returns None for a valid value, else the text after the field
name ("expected ..., got ..."); `message` puts the two together the same way on both
sides.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

PolicyName = Literal["raas", "dense", "streaming", "h2o", "quest"]
POLICY_NAMES: tuple[PolicyName, ...] = get_args(PolicyName)
Aggregation = Literal["max", "mean"]
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
# The policies whose eviction rule reads alpha (raas_backend/policies/raas.py).
ALPHA_POLICIES = frozenset({"raas"})
# Dense keeps every token: it has no budget to check or echo.
BUDGETLESS_POLICIES = frozenset({"dense"})

# Quest's page selection: "kv_group" (each KV head, i.e. the query heads of one GQA group,
# picks its own pages, as the Quest paper selects per head) or "layer" (one page set per
# layer for every head, ranked by the bound aggregated over all query heads; the
# engine's first quest, kept for comparison in docs/fidelity.md). An engine-side field
# (custom_params.kv_policy); the gateway does not take it from requests yet, so requests
# through it get the default.
QuestSelection = Literal["kv_group", "layer"]
QUEST_SELECTIONS: tuple[QuestSelection, ...] = get_args(QuestSelection)
DEFAULT_QUEST_SELECTION: QuestSelection = "kv_group"

# What a request may set, in the order error texts list them. page_size is an engine
# setting (RAAS_PAGE_SIZE), never a request's.
REQUEST_FIELDS = (
    "name",
    "budget_tokens",
    "alpha",
    "head_agg",
    "layer_agg",
    "refresh_top_fraction",
    "recent_tokens",
)

DEFAULT_POLICY: PolicyName = "raas"
# A request that sets no budget gets this one, through the gateway or straight to SGLang.
DEFAULT_BUDGET_TOKENS = 1024
# Chosen by the fidelity study (docs/fidelity.md). The adaptive variant: each step the top
# quarter of pages by attention mass (max over heads, max over layers) counts as used;
# alpha 0.99 leaves the choice to that fraction, which does not depend on the model's
# attention-mass scale as a fixed threshold does. The paper's 1e-4 marks every page used
# at every step on the bundled model, so RaaS degenerates into StreamingLLM.
DEFAULT_ALPHA = 0.99
DEFAULT_HEAD_AGG: Aggregation = "max"
DEFAULT_LAYER_AGG: Aggregation = "max"
DEFAULT_REFRESH_TOP_FRACTION = 0.25
DEFAULT_RECENT_TOKENS = 64
# Tokens per logical page; RAAS_PAGE_SIZE changes it for the engine and the gateway alike.
DEFAULT_PAGE_SIZE = 16
# A policy needs room for at least two pages: the page being written and one kept.
MIN_BUDGET_PAGES = 2
# The largest budget a request may ask for by default (the engine's RAAS_MAX_BUDGET_TOKENS,
# by which the CUDA path sizes its static score buffers; the gateway's cap).
MAX_BUDGET_TOKENS = 8192


def min_budget_tokens(page_size: int = DEFAULT_PAGE_SIZE) -> int:
    return MIN_BUDGET_PAGES * page_size


def message(field: str, problem: str) -> str:
    """`kv_policy.<field>: <problem>`, the text a client reads from either side."""
    return f"kv_policy.{field}: {problem}" if field else f"kv_policy: {problem}"


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true must not read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def name_problem(value: Any) -> str | None:
    if value in POLICY_NAMES:
        return None
    return f"expected one of {', '.join(POLICY_NAMES)}, got {value!r}"


def budget_problem(value: Any, low: int, high: int | None = None) -> str | None:
    """`low` is `min_budget_tokens(page_size)` or a server's higher floor; `high` a cap."""
    if is_int(value) and value >= low and (high is None or value <= high):
        return None
    wanted = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    return f"expected {wanted}, got {value!r}"


def alpha_problem(value: Any) -> str | None:
    if is_number(value) and math.isfinite(value) and 0.0 <= value < 1.0:
        return None
    return f"expected a number in [0, 1), got {value!r}"


def aggregation_problem(value: Any) -> str | None:
    if value in AGGREGATIONS:
        return None
    return f"expected one of {', '.join(AGGREGATIONS)}, got {value!r}"


def refresh_top_fraction_problem(value: Any) -> str | None:
    if is_number(value) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return None
    return f"expected a number in [0, 1], got {value!r}"


def recent_tokens_problem(value: Any) -> str | None:
    if is_int(value) and value >= 0:
        return None
    return f"expected an integer >= 0, got {value!r}"


def quest_selection_problem(value: Any) -> str | None:
    if value in QUEST_SELECTIONS:
        return None
    return f"expected one of {', '.join(QUEST_SELECTIONS)}, got {value!r}"


def h2o_recent_problem(recent_tokens: int, budget_tokens: int, page_size: int) -> str | None:
    """h2o protects its recent window inside the budget, so a page must remain beside it."""
    room = budget_tokens - page_size
    if recent_tokens <= room:
        return None
    return f"expected at most budget_tokens - page_size = {room}, got {recent_tokens}"


def request_properties(min_budget: int, max_budget: int | None = None) -> dict[str, Any]:
    """The request fields as JSON Schema properties (the OpenAPI document's `kv_policy`)."""
    number = {"type": "number"}
    budget: dict[str, Any] = {"type": "integer", "minimum": min_budget}
    if max_budget is not None:
        budget["maximum"] = max_budget
    return {
        "name": {"enum": list(POLICY_NAMES)},
        "budget_tokens": budget,
        "alpha": {**number, "minimum": 0, "exclusiveMaximum": 1},
        "head_agg": {"enum": list(AGGREGATIONS)},
        "layer_agg": {"enum": list(AGGREGATIONS)},
        "refresh_top_fraction": {**number, "minimum": 0, "maximum": 1},
        "recent_tokens": {"type": "integer", "minimum": 0},
    }
