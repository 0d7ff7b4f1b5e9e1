"""JSON on the request path: orjson where it can, the standard library where orjson refuses.

Every chat request parses its body, writes the engine's, parses the engine's answer (or
a stream's first and usage chunks) and writes log lines. orjson does each several times
faster than the standard library (measured warm on a 2-vCPU VM: a chat request body
6.7 -> 1.7 us to parse and 7.3 -> 0.5 us to write; a stream chunk 6.2 -> 1.6 us), and a
request's code runs cold when requests come one at a time, which multiplies each.

orjson reads an integer beyond 64 bits as a float, losing digits: a document with a run
of 19 or more digits, where such an integer could hide, is read by the standard library.

Two readers, because the two sides differ in what they may send:

- `loads_request` reads a client's body as strict JSON (RFC 8259, UTF-8): NaN and
  Infinity literals, lone surrogate escapes (`"\\ud800"`) and other encodings are
  refused with `InvalidJSON`. None of them could reach the engine faithfully (a NaN is
  written as `null`, a lone surrogate has no UTF-8 form), and OpenAI refuses them too.
- `loads` reads the engine's answers leniently (SGLang writes `-Infinity` logprobs).

Written out, a NaN or infinite float becomes `null` (valid JSON, where the standard
library would write a bare `NaN` that strict parsers refuse), and a string with a lone
surrogate (one read leniently from the engine) is written as its `\\u` escape: writing
never fails on a value one of the readers produced.
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


class InvalidJSON(ValueError):
    """A request body that is not strict JSON; the message is fit for the client."""


def loads(raw: bytes) -> Any:
    if _LONG_DIGIT_RUN.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def _refuse_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not a JSON value")


def loads_request(raw: bytes) -> Any:
    """A client's body as strict JSON; raises `InvalidJSON` with a client-fit message."""
    if _LONG_DIGIT_RUN.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # orjson's messages name its internals; the standard library says where.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"the body is not valid UTF-8 (at byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except InvalidJSON:
        raise
    except ValueError:
        # Python refuses to convert an integer of more than 4300 digits (CVE-2020-10735).
        raise InvalidJSON("a number has too many digits") from None
    except RecursionError:
        # Well under the size limit, `[[[[...` still exhausts the parser's stack.
        raise InvalidJSON("nested too deeply") from None
    if _has_lone_surrogate(data):
        raise InvalidJSON("a string holds a lone UTF-16 surrogate escape, which is not Unicode")
    return data


def _has_lone_surrogate(data: Any) -> bool:
    # Iterative: the document may be as deep as the parser allowed.
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON, as starlette's `JSONResponse` writes it."""
    try:
        return orjson.dumps(obj, default=default)
    except orjson.JSONEncodeError:
        # Integers past 64 bits, keys that are not strings: the standard library copes.
        text = json.dumps(obj, default=default, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError:
            # A lone surrogate has no UTF-8 form; its escape is ASCII.
            return json.dumps(obj, default=default, separators=(",", ":")).encode()


def dumps_str(obj: Any, **kw: Any) -> str:
    """`dumps` for structlog's JSON renderer, which passes `default=` and wants text."""
    return dumps(obj, default=kw.get("default")).decode()


class FastJSONResponse(JSONResponse):
    """starlette's `JSONResponse` with its body written by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
