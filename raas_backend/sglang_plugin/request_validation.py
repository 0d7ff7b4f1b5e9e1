"""Reject a bad `custom_params.kv_policy` where SGLang validates sampling parameters.

`SamplingParams.verify` runs in the HTTP process before the request reaches the
scheduler; a ValueError there becomes a 400 response naming the field.
"""

from __future__ import annotations

import functools
from typing import Any

from raas_backend.policies import PolicyConfigError
from raas_backend.sglang_plugin.runtime import defaults_from_env, parse_custom_params


@functools.cache
def _serves_on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def after_verify(result: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    config = parse_custom_params(getattr(params, "custom_params", None), defaults_from_env())
    if config.name == "quest" and _serves_on_cuda():
        # Quest picks pages per layer from that layer's query; the CUDA path builds one
        # list per step. Refuse rather than serve it densely under quest's name.
        raise PolicyConfigError(
            "name", "quest is not served on GPUs yet; use raas, h2o, streaming or dense"
        )
    return None
