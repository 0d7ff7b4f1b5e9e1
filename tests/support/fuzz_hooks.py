"""Schemathesis hooks for fuzzing the gateway (loaded through SCHEMATHESIS_HOOKS).

Generated chat bodies name random models and so would stop at the 404 check, never
reaching the KV policy resolution, the engine or the relay. Two bodies in three get the
served model's name instead; the choice hangs on the body itself so that a failing case
replays identically.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

SERVED_MODEL = os.environ.get("RAAS_FUZZ_MODEL", "smollm2-135m-instruct")


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    operation = context.operation
    if (
        operation is not None
        and operation.path == "/v1/chat/completions"
        and isinstance(body, dict)
        and len(repr(body)) % 3 != 0
    ):
        return {**body, "model": SERVED_MODEL}
    return body
