"""What the chat route reads from the HTTP request before anything else: the caller's API
key (401 when auth is on and it is missing or unknown) and the body (413 past the size
limit, 415 unless it is declared `application/json`, 422 when it is not a chat request,
400 for a field the API does not have).
"""

from __future__ import annotations

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from service import json_codec
from service.api import errors
from service.api.api_keys import ApiKey, KeyStore
from service.api.schemas import ChatCompletionRequest


def caller_key(keys: KeyStore, authorization: str | None) -> ApiKey | None:
    """The caller's key, or None when auth is off (no keys configured)."""
    if not keys.enabled:
        return None
    if not authorization:
        raise errors.unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.unauthorized("Malformed Authorization header: expected 'Bearer <key>'")
    key = keys.lookup(token.strip())
    if key is None:
        raise errors.unauthorized("Incorrect API key provided")
    return key


def is_json(content_type: str | None) -> bool:
    """`application/json`, with no charset or UTF-8 (RFC 8259: JSON is UTF-8)."""
    if content_type is None:
        return False
    media_type, *params = (part.strip().lower() for part in content_type.split(";"))
    if media_type != "application/json":
        return False
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    return all(charset in ("utf-8", "utf8") for charset in charsets)


async def read_chat_body(request: Request, limit: int) -> ChatCompletionRequest:
    """Read at most `limit` bytes, then parse; 413 past the limit, 415 if not declared
    JSON, 422 if malformed, 400 for an unknown field."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # Hung up mid-upload: the caller's doing, not a server error.
        raise errors.client_closed() from None
    # Checked once the body is in: the size limit answers first, whatever the type.
    if not is_json(request.headers.get("content-type")):
        raise errors.unsupported_media_type()
    raw = b"".join(chunks)
    try:
        data = json_codec.loads_request(raw)
    except json_codec.InvalidJSON as exc:
        raise errors.unprocessable(
            f"Request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise errors.unprocessable("Request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        unknown = [
            e["loc"][0] for e in problems if e["type"] == "extra_forbidden" and len(e["loc"]) == 1
        ]
        if unknown:
            raise errors.unknown_parameter(str(unknown[0])) from None
        raise errors.validation_error_to_openai(problems) from None
