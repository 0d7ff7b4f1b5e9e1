"""Reject a bad `custom_params.kv_policy` where SGLang validates sampling parameters.

`SamplingParams.verify` runs in the HTTP process before the request reaches the
scheduler; a ValueError there becomes a 400 response naming the field.
"""

from __future__ import annotations

from typing import Any

from raas_backend.sglang_plugin.runtime import defaults_from_env, parse_custom_params


def after_verify(result: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    parse_custom_params(getattr(params, "custom_params", None), defaults_from_env())
    return None
