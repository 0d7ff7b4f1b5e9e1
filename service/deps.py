"""FastAPI dependencies, as `Annotated` aliases, so routes declare what they need.

Everything comes from `app.state`, filled by the lifespan in `app.py`. All are `async
def`: FastAPI runs plain `def` dependencies in a thread pool, a hop per dependency that
costs more than the work itself. The chat route, the hot path, calls `caller_key` and
`read_chat_body` directly instead: solving a dependency graph per request costs more
than the checks do.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import ValidationError

from service import errors
from service.api_keys import ApiKey, KeyStore
from service.chat_service import ChatService
from service.engine_client import EngineClient
from service.engine_supervisor import EngineMonitor
from service.graceful_drain import Drain
from service.metrics import GatewayMetrics
from service.schemas import ChatCompletionRequest
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_key_store(request: Request) -> KeyStore:
    return request.app.state.key_store


async def get_chat_service(request: Request) -> ChatService:
    return request.app.state.chat_service


async def get_engine_monitor(request: Request) -> EngineMonitor:
    return request.app.state.engine_monitor


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


async def get_engine_client(request: Request) -> EngineClient:
    return request.app.state.engine_client


async def get_drain(request: Request) -> Drain:
    return request.app.state.drain


SettingsDep = Annotated[Settings, Depends(get_settings)]
KeyStoreDep = Annotated[KeyStore, Depends(get_key_store)]
ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
EngineMonitorDep = Annotated[EngineMonitor, Depends(get_engine_monitor)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
EngineClientDep = Annotated[EngineClient, Depends(get_engine_client)]
DrainDep = Annotated[Drain, Depends(get_drain)]


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


async def authenticate(
    keys: KeyStoreDep,
    authorization: Annotated[str | None, Header()] = None,
) -> ApiKey | None:
    return caller_key(keys, authorization)


ApiKeyDep = Annotated[ApiKey | None, Depends(authenticate)]


async def read_chat_body(request: Request, limit: int) -> ChatCompletionRequest:
    """Read at most `limit` bytes, then parse; 413 past the limit, 422 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.unprocessable(
            f"Request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise errors.unprocessable("Request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise errors.validation_error_to_openai(exc.errors()) from exc
