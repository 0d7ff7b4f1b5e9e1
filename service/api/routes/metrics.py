from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import EngineClientDep, EngineMonitorDep, MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(
    gateway: MetricsDep, monitor: EngineMonitorDep, engine: EngineClientDep
) -> Response:
    """Prometheus exposition; scrapes the engine's /metrics on the way (bounded timeout),
    each engine's behind a router."""
    gateway.sync_engine_state(monitor.ready, monitor.restarts)
    gateway.engine.update(await engine.replica_metrics())
    return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)
