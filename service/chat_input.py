"""What the chat route reads from the HTTP request before anything else: the caller's API
key (401 when auth is on and it is missing or unknown) and the body (413 past the size
limit, 422 when it is not a chat request).
"""

from __future__ import annotations

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from service import errors, json_codec
from service.api_keys import ApiKey, KeyStore
from service.schemas import ChatCompletionRequest


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


async def read_chat_body(request: Request, limit: int) -> ChatCompletionRequest:
    """Read at most `limit` bytes, then parse; 413 past the limit, 422 if malformed."""
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
        raise errors.validation_error_to_openai(exc.errors()) from exc
