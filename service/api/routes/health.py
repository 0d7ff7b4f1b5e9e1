from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import DrainDep, EngineMonitorDep, SettingsDep
from service.api.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> Liveness:
    """The gateway process answers; says nothing about the engine."""
    return Liveness()


@router.get("/health/ready", responses={503: {"model": Readiness}})
async def ready(monitor: EngineMonitorDep, settings: SettingsDep, drain: DrainDep) -> JSONResponse:
    """200 only while the engine can take requests (503 while it starts or restarts, and
    while the gateway drains before shutting down)."""
    ready = monitor.ready and not drain.active
    body = Readiness(
        status="draining" if drain.active else "ready" if monitor.ready else "not_ready",
        engine_mode=settings.engine_mode,
        engine_state=monitor.state.value,
        engine_restarts=monitor.restarts,
    )
    if ready:
        return JSONResponse(body.model_dump())
    retry_s = settings.retry_after_s if drain.active else settings.engine_retry_after_s
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry_s)})
