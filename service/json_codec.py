"""JSON on the request path: orjson where it can, the standard library where orjson refuses.

Every chat request parses its body, writes the engine's, parses the engine's answer (or
a stream's first and usage chunks) and writes log lines. orjson does each several times
faster than the standard library (measured warm on a 2-vCPU VM: a chat request body
6.7 -> 1.7 us to parse and 7.3 -> 0.5 us to write; a stream chunk 6.2 -> 1.6 us), and a
request's code runs cold when requests come one at a time, which multiplies each.

orjson is stricter: it refuses NaN and Infinity literals, lone surrogate escapes and
encodings other than UTF-8; and it reads an integer beyond 64 bits as a float, losing
digits. The standard library parses those documents instead (any with a run of 19 or more
digits, where such an integer could hide), so the gateway reads exactly what it read
before, and a document both refuse raises the standard library's error. Written out, a
NaN or infinite float becomes `null` (valid JSON, where the standard library would write
a bare `NaN` that strict parsers refuse).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import JSONResponse

# 2**63 has 19 digits: a shorter run of digits is an integer orjson reads exactly.
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{19}")


def loads(raw: bytes) -> Any:
    if _LONG_DIGIT_RUN.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON, as starlette's `JSONResponse` writes it."""
    try:
        return orjson.dumps(obj, default=default)
    except orjson.JSONEncodeError:
        # Integers past 64 bits, keys that are not strings: the standard library copes.
        text = json.dumps(obj, default=default, ensure_ascii=False, separators=(",", ":"))
        return text.encode()


def dumps_str(obj: Any, **kw: Any) -> str:
    """`dumps` for structlog's JSON renderer, which passes `default=` and wants text."""
    return dumps(obj, default=kw.get("default")).decode()


class FastJSONResponse(JSONResponse):
    """starlette's `JSONResponse` with its body written by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
