"""FastAPI dependencies, as `Annotated` aliases, so routes declare what they need.

Everything comes from `app.state`, filled by the lifespan in `app.py`. All are `async
def`: FastAPI runs plain `def` dependencies in a thread pool, a hop per dependency that
costs more than the work itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.api_keys import ApiKey, KeyStore
from service.chat.completions import ChatService
from service.chat.input import caller_key
from service.engine.client import EngineClient
from service.engine.supervisor import EngineMonitor
from service.server.drain import Drain
from service.server.metrics import GatewayMetrics
from service.server.settings import Settings


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


async def authenticate(
    keys: KeyStoreDep,
    authorization: Annotated[str | None, Header()] = None,
) -> ApiKey | None:
    return caller_key(keys, authorization)


ApiKeyDep = Annotated[ApiKey | None, Depends(authenticate)]
