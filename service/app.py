"""The app factory: `create_app(settings)` builds an isolated gateway (tests build many).

Clients, the engine supervisor and the metrics registry are created in the lifespan and
kept on `app.state`; nothing lives at module level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI

from service.api.api_keys import load_key_store
from service.api.errors import install_error_handlers
from service.api.routes import chat, health, metrics, models
from service.chat.admission import AdmissionController
from service.chat.completions import ChatService
from service.engine.client import EngineClient
from service.engine.model_config import kv_bytes_per_token_from_dir
from service.engine.supervisor import EmbeddedEngine, make_engine_monitor
from service.server.drain import Drain
from service.server.http_metrics import HttpMetricsMiddleware
from service.server.metrics import GatewayMetrics
from service.server.settings import Settings

log = structlog.get_logger(__name__)


def _version() -> str:
    try:
        return version("raas-serve")
    except PackageNotFoundError:
        return "0+unknown"


def _bytes_per_token(settings: Settings, model_dir: Path | None) -> int | None:
    if settings.kv_bytes_per_token is not None:
        return settings.kv_bytes_per_token
    if model_dir is None:
        return None
    return kv_bytes_per_token_from_dir(model_dir, settings.engine_dtype)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Read keys now, not in the lifespan: a broken keys file should stop start-up loudly.
    key_store = load_key_store(
        settings.api_keys_file,
        settings.api_keys,
        budget_range=(settings.kv_min_budget_tokens, settings.kv_max_budget_tokens),
        max_tokens_limit=settings.max_tokens_limit,
    )
    model_dir = Path(settings.model_path) if settings.model_path else None
    gateway_metrics = GatewayMetrics(_bytes_per_token(settings, model_dir))
    drain = Drain()
    gateway_metrics.gateway_info.labels(
        settings.model_name, settings.engine_mode, settings.engine_attention_backend
    ).set(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_client = EngineClient(
            settings.upstream_url,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_timeout_s,
            max_connections=settings.upstream_max_connections,
            metrics_timeout_s=settings.engine_metrics_timeout_s,
        )
        monitor = make_engine_monitor(settings, engine_client)
        if isinstance(monitor, EmbeddedEngine) and gateway_metrics.bytes_per_kv_token is None:
            monitor.on_model_path = lambda path: gateway_metrics.set_bytes_per_kv_token(
                _bytes_per_token(settings, path)
            )
        admission = AdmissionController(
            settings.max_in_flight, settings.max_queue, settings.queue_timeout_s
        )
        gateway_metrics.in_flight.set_function(lambda: admission.in_flight)
        gateway_metrics.queued.set_function(lambda: admission.queued)
        chat_service = ChatService(
            settings, engine_client, monitor, admission, gateway_metrics, drain
        )

        app.state.engine_client = engine_client
        app.state.engine_monitor = monitor
        app.state.admission = admission
        app.state.chat_service = chat_service
        await monitor.start()
        log.info(
            "gateway.started",
            model=settings.model_name,
            engine_mode=settings.engine_mode,
            engine_url=settings.upstream_url,
            auth=key_store.enabled,
            api_keys=len(key_store),
        )
        try:
            yield
        finally:
            await chat_service.aclose()
            await monitor.stop()
            await engine_client.aclose()
            log.info("gateway.stopped")

    app = FastAPI(
        title="raas-serve gateway",
        version=_version(),
        summary="OpenAI-compatible chat API with per-request KV-cache budgets",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.key_store = key_store
    app.state.metrics = gateway_metrics
    app.state.drain = drain
    install_error_handlers(app)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            chat.document_limits(build_openapi(), settings)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    for module in (chat, models, health, metrics):
        app.include_router(module.router)
    app.add_middleware(HttpMetricsMiddleware, metrics=gateway_metrics)
    return app
