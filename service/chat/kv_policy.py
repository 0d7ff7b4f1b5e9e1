"""The `kv_policy` request extension: parse it, resolve it against caps, echo it back.

A request names a KV policy, a budget and alpha, in the body (`"kv_policy": {...}`, what
OpenAI clients send through `extra_body`) or in the `X-KV-Policy` header. Missing fields
take the API key's defaults, then the server's. Values must satisfy
`min_budget <= request <= key cap <= server cap`; anything else is a 400 naming the field.
Names, ranges, defaults and error texts come from the one specification the engine checks
too (raas_backend/policy_spec.py); what is here is the HTTP side: header and body parsing,
the caller's caps and the echo in `usage.kv_cache`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from raas_backend import policy_spec as spec
from raas_backend.policy_spec import POLICY_NAMES, Aggregation, PolicyName
from service.api.errors import invalid_field

if TYPE_CHECKING:
    from service.api.api_keys import ApiKey
    from service.server.settings import Settings

HEADER = "X-KV-Policy"
FIELD = "kv_policy"


class KvPolicyRequest(BaseModel):
    """What a client may ask for; every field optional.

    Beyond name/budget/alpha, the engine's tuning knobs pass through when given (they
    exist for fidelity studies): `head_agg` / `layer_agg` ("max" or "mean"),
    `refresh_top_fraction` in [0, 1] and h2o's `recent_tokens` >= 0.
    """

    model_config = ConfigDict(extra="forbid")

    name: StrictStr | None = None
    budget_tokens: StrictInt | None = None
    # StrictFloat takes an integer too, as a float; one past a float's range is refused.
    alpha: StrictFloat | None = None
    head_agg: StrictStr | None = None
    layer_agg: StrictStr | None = None
    refresh_top_fraction: StrictFloat | None = None
    recent_tokens: StrictInt | None = None

    def merged_over(self, base: KvPolicyRequest) -> KvPolicyRequest:
        """Fields set here win; the rest come from `base` (body over header)."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


def request_json_schema() -> dict[str, Any]:
    """`kv_policy` in the OpenAPI document: what `resolve` accepts, as far as JSON Schema
    can say it (the budget's range depends on the server and the key; the server's is
    written in by the app)."""
    return {
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "properties": spec.request_properties(spec.min_budget_tokens()),
            },
            {"type": "null"},
        ],
        "description": "The KV-cache policy and budget (docs/api.md); errors are 400s naming "
        "the field",
    }


class EffectivePolicy(BaseModel):
    """What the engine is told to do. `dense` keeps every token, so it has no budget.

    None means "not applicable" (dense) or "the engine's default" (tuning knobs); such
    fields are left out of what the engine receives.
    """

    name: PolicyName
    budget_tokens: int | None
    alpha: float | None
    head_agg: Aggregation | None = None
    layer_agg: Aggregation | None = None
    refresh_top_fraction: float | None = None
    recent_tokens: int | None = None

    def for_engine(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class KvCacheUsage(BaseModel):
    """`usage.kv_cache` in a response: the effective policy plus what the engine measured."""

    policy: PolicyName
    budget_tokens: int | None
    alpha: float | None
    peak_retained_tokens: int | None = None
    dense_equivalent_tokens: int | None = None
    evicted_pages: int | None = None

    @property
    def engine_reported(self) -> bool:
        return self.peak_retained_tokens is not None and self.dense_equivalent_tokens is not None

    @classmethod
    def merge(cls, effective: EffectivePolicy, engine: Any) -> KvCacheUsage:
        """The gateway's effective values, plus the engine's numbers where it sent them."""
        numbers: dict[str, int] = {}
        if isinstance(engine, dict):
            for key in ("peak_retained_tokens", "dense_equivalent_tokens", "evicted_pages"):
                value = engine.get(key)
                # bool is an int subclass; an engine never means True as a token count.
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    numbers[key] = value
        return cls(
            policy=effective.name,
            budget_tokens=effective.budget_tokens,
            alpha=effective.alpha,
            **numbers,
        )


@dataclass(frozen=True)
class PolicyLimits:
    """Defaults and caps for one caller: the server's, narrowed by the API key's."""

    allowed: frozenset[str]
    default_name: str
    default_budget: int
    default_alpha: float
    min_budget: int
    max_budget: int
    cap_source: str

    @classmethod
    def for_caller(cls, settings: Settings, key: ApiKey | None) -> PolicyLimits:
        allowed = frozenset(settings.kv_allowed_policies)
        max_budget = settings.kv_max_budget_tokens
        cap_source = "server"
        default_name: str = settings.kv_default_policy
        default_budget = settings.kv_default_budget_tokens
        default_alpha = settings.kv_default_alpha
        if key is not None:
            if key.allowed_policies is not None:
                allowed = allowed & frozenset(key.allowed_policies)
            if key.max_budget_tokens is not None and key.max_budget_tokens < max_budget:
                max_budget = key.max_budget_tokens
                cap_source = "API key"
            default_name = key.default_policy or default_name
            default_budget = key.default_budget_tokens or default_budget
            if key.default_alpha is not None:
                default_alpha = key.default_alpha
        if default_name not in allowed and allowed:
            default_name = min(allowed, key=POLICY_NAMES.index)
        max_budget = max(max_budget, settings.kv_min_budget_tokens)
        return cls(
            allowed=allowed,
            default_name=default_name,
            default_budget=min(default_budget, max_budget),
            default_alpha=default_alpha,
            min_budget=settings.kv_min_budget_tokens,
            max_budget=max_budget,
            cap_source=cap_source,
        )


_NOTHING_ASKED = KvPolicyRequest()


def parse_body_field(raw: Any) -> KvPolicyRequest:
    """Validate the body's `kv_policy` object; any problem is a 400 naming the field."""
    if raw is None:
        return _NOTHING_ASKED
    if not isinstance(raw, dict):
        raise invalid_field(FIELD, f"expected {FIELD} to be an object, got {type(raw).__name__}")
    return _validate(raw, prefix=FIELD)


def parse_header(value: str | None) -> KvPolicyRequest:
    """`X-KV-Policy: name=raas,budget_tokens=256,alpha=0.1` (or the same as a JSON object)."""
    if value is None or not value.strip():
        return KvPolicyRequest()
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise invalid_field(HEADER, f"{HEADER} is not valid JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise invalid_field(HEADER, f"expected a JSON object in {HEADER}")
        return _validate(data, prefix=FIELD)

    fields: dict[str, Any] = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise invalid_field(HEADER, f"expected key=value pairs in {HEADER}, got {item!r}")
        if key in fields:
            raise invalid_field(HEADER, f"{key!r} appears twice in {HEADER}")
        fields[key] = _header_value(key, raw)
    return _validate(fields, prefix=FIELD)


def _header_value(key: str, raw: str) -> Any:
    param = f"{FIELD}.{key}"
    if key in ("budget_tokens", "recent_tokens"):
        try:
            return int(raw)
        except ValueError as exc:
            raise invalid_field(param, f"expected an integer for {param}, got {raw!r}") from exc
    if key in ("alpha", "refresh_top_fraction"):
        try:
            return float(raw)
        except ValueError as exc:
            raise invalid_field(param, f"expected a number for {param}, got {raw!r}") from exc
    return raw


def _validate(data: dict[str, Any], prefix: str) -> KvPolicyRequest:
    try:
        return KvPolicyRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        param = f"{prefix}.{loc}" if loc else prefix
        if first["type"] == "extra_forbidden":
            known = ", ".join(spec.REQUEST_FIELDS)
            message = f"{param}: unknown field; expected one of {known}"
        else:
            message = f"{param}: {first['msg']}"
        raise invalid_field(param, message) from exc


def _refuse(field: str, problem: str, code: str = "invalid_value") -> None:
    raise invalid_field(f"{FIELD}.{field}", spec.message(field, problem), code=code)


def resolve(requested: KvPolicyRequest, limits: PolicyLimits) -> EffectivePolicy:
    """Fill defaults and enforce the caller's caps; raises a 400 `OpenAIError`."""
    name = requested.name if requested.name is not None else limits.default_name
    if problem := spec.name_problem(name):
        _refuse("name", problem)
    if name not in limits.allowed:
        allowed = ", ".join(p for p in POLICY_NAMES if p in limits.allowed)
        _refuse("name", f"{name!r} is not allowed here; allowed: {allowed}", "policy_not_allowed")

    budget = requested.budget_tokens
    if budget is not None and (
        problem := spec.budget_problem(budget, limits.min_budget, limits.max_budget)
    ):
        _refuse("budget_tokens", f"{problem} (the {limits.cap_source} cap)")
    alpha = requested.alpha
    if alpha is not None and (problem := spec.alpha_problem(alpha)):
        _refuse("alpha", problem)

    tuning = _tuning(requested)
    if name in spec.BUDGETLESS_POLICIES:
        return EffectivePolicy(name="dense", budget_tokens=None, alpha=None)
    if name not in spec.ALPHA_POLICIES:
        # Nothing else reads alpha: echoing one would claim a setting that does nothing.
        alpha = None
    elif alpha is None:
        alpha = limits.default_alpha
    return EffectivePolicy(
        name=name,  # type: ignore[arg-type]
        budget_tokens=budget if budget is not None else limits.default_budget,
        alpha=None if alpha is None else float(alpha),
        **tuning,
    )


def _tuning(requested: KvPolicyRequest) -> dict[str, Any]:
    tuning: dict[str, Any] = {}
    for agg in ("head_agg", "layer_agg"):
        value = getattr(requested, agg)
        if value is not None and (problem := spec.aggregation_problem(value)):
            _refuse(agg, problem)
        tuning[agg] = value
    fraction = requested.refresh_top_fraction
    if fraction is not None and (problem := spec.refresh_top_fraction_problem(fraction)):
        _refuse("refresh_top_fraction", problem)
    tuning["refresh_top_fraction"] = float(fraction) if fraction is not None else None
    recent = requested.recent_tokens
    if recent is not None and (problem := spec.recent_tokens_problem(recent)):
        _refuse("recent_tokens", problem)
    tuning["recent_tokens"] = recent
    return tuning


def resolve_request(body_field: Any, header: str | None, limits: PolicyLimits) -> EffectivePolicy:
    requested = parse_body_field(body_field)
    if header is not None and header.strip():
        requested = requested.merged_over(parse_header(header))
    return resolve(requested, limits)
