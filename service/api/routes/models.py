from __future__ import annotations

from fastapi import APIRouter

from service import errors
from service.deps import ApiKeyDep, SettingsDep
from service.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(_: ApiKeyDep, settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.model_name)])


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, _: ApiKeyDep, settings: SettingsDep) -> ModelCard:
    if model_id != settings.model_name:
        raise errors.model_not_found(model_id)
    return ModelCard(id=settings.model_name)
