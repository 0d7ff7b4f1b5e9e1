"""From a client's chat request to the body SGLang receives.

Value checks answer 400 naming the parameter (404 for an unknown model). Which fields
exist at all is the schema's business (service/api/schemas.py): it takes OpenAI's fields and
the SGLang extensions that cannot bypass the gateway, never `rid` or `custom_params`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from service.api.api_keys import ApiKey
from service.api.errors import invalid_field, model_not_found
from service.api.schemas import ChatCompletionRequest
from service.chat.kv_policy import EffectivePolicy
from service.server.settings import Settings

# OpenAI fields that mean nothing to a self-hosted engine; accepted and dropped.
IGNORED_OPENAI_FIELDS = frozenset(
    {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
)
MAX_TOP_LOGPROBS = 20
_NOT_FORWARDED = IGNORED_OPENAI_FIELDS | {"kv_policy"}


def check_values(req: ChatCompletionRequest, settings: Settings) -> None:
    """Raise a 400/404 `OpenAIError` for the first value the gateway does not accept."""
    if req.model != settings.model_name:
        raise model_not_found(req.model)
    if not req.messages:
        raise invalid_field("messages", "expected at least one message, got none")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field)
        if value is not None and not (1 <= value <= settings.max_tokens_limit):
            raise invalid_field(
                field, f"expected {field} in [1, {settings.max_tokens_limit}], got {value}"
            )
    if req.n is not None and not (1 <= req.n <= settings.max_n):
        raise invalid_field("n", f"expected n in [1, {settings.max_n}], got {req.n}")
    _check_range("temperature", req.temperature, 0.0, 2.0)
    _check_range("top_p", req.top_p, 0.0, 1.0, low_open=True)
    _check_range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _check_range("min_p", req.min_p, 0.0, 1.0)
    _check_range("repetition_penalty", req.repetition_penalty, 0.0, 2.0, low_open=True)
    if req.min_tokens is not None and req.min_tokens < 0:
        raise invalid_field("min_tokens", f"expected min_tokens >= 0, got {req.min_tokens}")
    if req.top_k is not None and req.top_k != -1 and req.top_k < 1:
        raise invalid_field("top_k", f"expected top_k -1 (off) or >= 1, got {req.top_k}")
    if any(token < 0 for token in req.stop_token_ids or ()):
        raise invalid_field("stop_token_ids", "expected token ids >= 0")
    if req.top_logprobs is not None:
        if not (0 <= req.top_logprobs <= MAX_TOP_LOGPROBS):
            raise invalid_field(
                "top_logprobs",
                f"expected top_logprobs in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
            )
        if not req.logprobs:
            raise invalid_field("top_logprobs", "top_logprobs requires logprobs=true")
    if req.stream_options is not None and not req.stream:
        raise invalid_field("stream_options", "stream_options is only allowed with stream=true")
    _check_logit_bias(req.logit_bias)
    if req.tool_choice not in (None, "none") and not req.tools:
        raise invalid_field("tool_choice", "tool_choice is only allowed when tools are given")
    if req.seed is not None:
        _check_seed(req.seed, settings)


def _check_range(
    name: str, value: float | None, low: float, high: float, *, low_open: bool = False
) -> None:
    if value is None:
        return
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise invalid_field(name, f"expected {name} in {bracket}{low:g}, {high:g}], got {value}")


MAX_LOGIT_BIAS = 100.0


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    # SGLang would hand a bad key to Python's int() and echo its message back.
    for token, value in (bias or {}).items():
        if not (token.isascii() and token.isdigit()):
            raise invalid_field(
                "logit_bias", f"expected token ids (non-negative integers) as keys, got {token!r}"
            )
        if not (math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise invalid_field(
                "logit_bias",
                f"expected a bias in [-100, 100] for token {token}, got {value}",
            )


def uses_tools(req: ChatCompletionRequest) -> bool:
    """Whether the request asks the model to call tools (tools given, choice not "none")."""
    return bool(req.tools) and req.tool_choice != "none"


def default_max_tokens(settings: Settings, key: ApiKey | None) -> int | None:
    """The output cap of a request that sets none: the key's, else the server's."""
    if key is not None and key.default_max_tokens is not None:
        return key.default_max_tokens
    return settings.default_max_tokens


SEED_RANGE = (-(2**63), 2**63 - 1)


def _check_seed(seed: int, settings: Settings) -> None:
    if not settings.engine_honours_seed:
        raise invalid_field(
            "seed",
            "seed is not supported by this server: its engine cannot sample reproducibly "
            "(for repeatable output use temperature 0)",
            code="unsupported_parameter",
        )
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise invalid_field("seed", f"expected seed in [-2**63, 2**63 - 1], got {seed}")


def upstream_body(
    req: ChatCompletionRequest,
    policy: EffectivePolicy,
    rid: str,
    settings: Settings,
    key: ApiKey | None = None,
) -> dict[str, Any]:
    body = req.model_dump(exclude_none=True, by_alias=True, exclude=_NOT_FORWARDED)
    cap = default_max_tokens(settings, key)
    if req.max_tokens is None and req.max_completion_tokens is None and cap is not None:
        body["max_completion_tokens"] = cap
    if req.stream:
        # Always ask for the usage chunk: metrics and usage.kv_cache come from it. It is
        # dropped again on the way out unless the client asked for it.
        body["stream_options"] = {"include_usage": True}
    else:
        # The engine's per-request timings (each choice's meta_info, taken off again by
        # `engine_decode_s`): a whole answer arrives at once, so the gateway cannot time
        # its first token itself.
        body["return_meta_info"] = True
    body["rid"] = rid
    body["custom_params"] = {"kv_policy": policy.for_engine()}
    return body


def engine_decode_s(data: dict[str, Any]) -> float | None:
    """Remove each choice's `meta_info` (asked for by `upstream_body`, not for the client)
    and return the engine's decode time after the first token, the longest over the
    choices; None when the engine did not time it (started without --enable-metrics)."""
    decode: float | None = None
    for choice in data.get("choices") or ():
        meta = choice.pop("meta_info", None) if isinstance(choice, dict) else None
        if not isinstance(meta, dict):
            continue
        e2e, first = meta.get("e2e_latency"), meta.get("first_token_latency")
        if isinstance(e2e, int | float) and isinstance(first, int | float) and e2e >= first:
            decode = max(decode or 0.0, float(e2e - first))
    return decode


def wants_usage_chunk(req: ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# SGLang 0.5.23's refusal of a prompt + max_tokens past the context (tokenizer_manager.py).
_PAST_CONTEXT = re.compile(
    r"maximum context length of (\d+) tokens\. You requested a total of \d+ tokens: "
    r"(\d+) tokens from the input messages"
)


def fit_default_cap(
    req: ChatCompletionRequest, body: dict[str, Any], engine_error: Any
) -> dict[str, Any] | None:
    """`body` again with the default cap cut to what the context leaves after the prompt,
    when the engine refused it for that; None when there is nothing to fit (the client
    set the cap, it is another error, or the prompt fills the context)."""
    if req.max_tokens is not None or req.max_completion_tokens is not None:
        return None
    message = engine_error.get("message") if isinstance(engine_error, dict) else None
    match = _PAST_CONTEXT.search(message) if isinstance(message, str) else None
    if match is None:
        return None
    room = int(match.group(1)) - int(match.group(2))
    if not 1 <= room < body.get("max_completion_tokens", 0):
        return None
    return {**body, "max_completion_tokens": room}
