"""Errors in OpenAI's shape, and the handlers that make every failure one of them.

Whatever goes wrong, a client gets `{"error": {"message", "type", "param", "code"}}` with
the status OpenAI would use; a stack trace never leaves the process (it goes to the log).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.json_codec import FastJSONResponse

log = structlog.get_logger(__name__)

ENGINE_PARAM_PREFIX = re.compile(r"^(kv_policy(?:\.\w+)?):")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenAIError(Exception):
    """An error that becomes an OpenAI-shaped response with the given status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.detail).model_dump()

    def response(self) -> FastJSONResponse:
        return FastJSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def invalid_field(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# The gateway's to set: a client may not send them.
RESERVED_FIELDS = frozenset({"rid", "custom_params"})


def unknown_parameter(name: str) -> OpenAIError:
    if name in RESERVED_FIELDS:
        return invalid_field(name, f"{name!r} is set by the gateway and may not be sent")
    return OpenAIError(
        400,
        f"Unrecognized request argument supplied: {name}",
        param=name,
        code="unknown_parameter",
    )


def unsupported_media_type() -> OpenAIError:
    return OpenAIError(
        415,
        "Expected Content-Type: application/json (UTF-8)",
        code="unsupported_media_type",
    )


def unprocessable(message: str, param: str | None = None, code: str = "invalid_schema"):
    return OpenAIError(422, message, param=param, code=code)


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model {model!r} does not exist",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"Request body exceeds the limit of {limit} bytes",
        code="request_too_large",
    )


def overloaded(message: str, code: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        429,
        message,
        type="rate_limit_error",
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


# An engine restart takes tens of seconds; clients (the openai SDK among them) wait this
# long before retrying, rather than spending their retries at once.
ENGINE_RETRY_AFTER_S = 5


def engine_unavailable(
    message: str = "The inference engine is not available",
    retry_after_s: int = ENGINE_RETRY_AFTER_S,
) -> OpenAIError:
    return OpenAIError(
        503,
        message,
        type="server_error",
        code="engine_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def draining(retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        503,
        "The server is shutting down; retry on another replica",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": str(retry_after_s)},
    )


# nginx's "client closed request": nobody reads it, but logs and metrics must not count
# the caller's own hang-up as a server error.
CLIENT_CLOSED = 499


def client_closed() -> OpenAIError:
    return OpenAIError(CLIENT_CLOSED, "Client closed the request", code="client_closed")


def upstream_timeout(seconds: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"The inference engine did not answer within {seconds:g} s",
        type="server_error",
        code="upstream_timeout",
    )


def engine_error(status_code: int, message: str | None = None) -> OpenAIError:
    return OpenAIError(
        502,
        message or f"The inference engine failed the request (HTTP {status_code})",
        type="server_error",
        code=f"engine_error_{status_code}",
    )


# What must never reach a client from the engine: source paths and tracebacks, pydantic's
# error dumps, Python's own exception texts (SGLang returns `str(exc)` of whatever it hit).
_INTERNALS = re.compile(
    r"""Traceback|File\ "|\.py\b|line\ \d+|\bEndpoint:|validation\ errors?\b|'loc':|
    errors\.pydantic\.dev|invalid\ literal\ for|object\ has\ no\ attribute|
    object\ is\ not|unsupported\ operand|not\ subscriptable|\b[A-Z]\w+(Error|Exception):|
    Internal\ server\ error""",
    re.VERBOSE,
)
# A pydantic error's location inside such a dump: `'loc': ('body', 'tools', 0, 'function')`.
_DUMPED_LOC = re.compile(r"'loc': \(([^)]*)\)")
# SGLang's sampling parameters and the request fields clients know them by.
_ENGINE_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_new_tokens": "min_tokens",
    "max_new_tokens": "max_tokens",
    "logit_bias": "logit_bias",
    "sampling_seed": "seed",
    "stop_token_ids": "stop_token_ids",
    "tool_choice": "tool_choice",
    "tools": "tools",
    "response_format": "response_format",
}
_ENGINE_FIELD = re.compile(r"\b(" + "|".join(_ENGINE_FIELDS) + r")\b")
_CONTEXT_LENGTH = re.compile(r"context length|maximum context", re.IGNORECASE)


def clean_engine_message(message: str) -> tuple[str, str | None]:
    """An engine's error message fit for a client, and the field it is about, if known.

    A message that carries engine internals is replaced by one naming the field; the
    original goes to the log.
    """
    param = _param_from_message(message)
    if param is None:
        dumped = _DUMPED_LOC.search(message)
        if dumped:
            parts = [p.strip().strip("'\"") for p in dumped.group(1).split(",")]
            param = _loc_to_param([int(p) if p.isdigit() else p for p in parts if p])
        elif _CONTEXT_LENGTH.search(message):
            param = "messages"
        else:
            named = _ENGINE_FIELD.search(message)
            param = _ENGINE_FIELDS[named.group(1)] if named else None
    if not _INTERNALS.search(message):
        return message, param
    log.info("engine.error_message_withheld", message=message[:2000])
    if param is None:
        return "The inference engine rejected the request as invalid", None
    return f"Invalid value for {param!r} (rejected by the inference engine)", param


def from_engine_payload(status_code: int, payload: Any) -> OpenAIError:
    """Translate an SGLang error body (flat `{"object": "error", ...}` or nested) to ours."""
    detail = payload.get("error", payload) if isinstance(payload, dict) else {}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    raw = str(detail.get("message") or f"engine returned HTTP {status_code}")
    message, param = clean_engine_message(raw)
    if isinstance(detail.get("param"), str):
        param = detail["param"]
    if 400 <= status_code < 500:
        # SGLang's 4xx are the client's fault (prompt too long, bad message); keep the status.
        status = 400 if status_code in (400, 422) else status_code
        return OpenAIError(status, message, param=param, code="invalid_request")
    if status_code == 503:
        return engine_unavailable()
    # An engine's 5xx says what broke inside it (SGLang: "Internal server error: <exc>"):
    # the log keeps it, the client learns only that it failed.
    log.warning("engine.server_error", status=status_code, message=raw[:2000])
    return engine_error(status_code)


def _param_from_message(message: str) -> str | None:
    # The raas plugin prefixes its validation errors with the field: "kv_policy.x: ...".
    match = ENGINE_PARAM_PREFIX.match(message)
    return match.group(1) if match else None


# Where a discriminated union puts its tag in an error's location: after the message's
# index (`messages.0.user.content`) and after `response_format`. The tag is not a field.
_TAG_AFTER_INDEX_OF = frozenset({"messages"})
_TAG_AFTER = frozenset({"response_format"})


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    """The field path a client wrote, without pydantic's union branches and tags."""
    parts: list[str] = []
    previous: list[Any] = []
    for part in loc:
        skip = (
            part == "body"
            or (bool(previous) and previous[-1] in _TAG_AFTER)
            or (
                len(previous) >= 2
                and isinstance(previous[-1], int)
                and previous[-2] in _TAG_AFTER_INDEX_OF
            )
            # Union branches: `str`, `list[TextPart]`, `literal['none', ...]`, `ToolCall`.
            or (isinstance(part, str) and (part in _BRANCHES or "[" in part or part[:1].isupper()))
        )
        previous.append(part)
        if not skip:
            parts.append(str(part))
    return ".".join(parts) or None


_BRANCHES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _most_telling(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    # A union reports every branch; "should be a valid string" about a list is noise
    # when another branch says what is wrong inside it.
    for error in errors:
        if not str(error.get("type", "")).endswith("_type"):
            return error
    return errors[0]


def validation_error_to_openai(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """A schema error as a 422 naming the field; pydantic's own words, never its dump."""
    if not errors:
        return unprocessable("Invalid request body")
    first = _most_telling(errors)
    param = _loc_to_param(first.get("loc", ()))
    where = f" at {param!r}" if param else ""
    return unprocessable(f"{first.get('msg', 'invalid value')}{where}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_: Request, exc: OpenAIError) -> FastJSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> FastJSONResponse:
        return validation_error_to_openai(exc.errors()).response()

    async def on_http_exception(_: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return OpenAIError(
            exc.status_code, message, type=kind, code=code, headers=exc.headers
        ).response()

    async def on_unexpected(request: Request, exc: Exception) -> FastJSONResponse:
        log.exception("request.unhandled_error", path=request.url.path)
        return OpenAIError(
            500, "Internal server error", type="server_error", code="internal_error"
        ).response()

    app.add_exception_handler(OpenAIError, on_openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
