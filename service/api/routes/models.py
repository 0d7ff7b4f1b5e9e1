from __future__ import annotations

from fastapi import APIRouter

from service.api import errors
from service.api.api_keys import ApiKey
from service.api.deps import ApiKeyDep, SettingsDep
from service.api.schemas import ModelCard, ModelList
from service.chat.request import default_max_tokens
from service.server.settings import Settings

router = APIRouter(tags=["models"])


def _card(settings: Settings, key: ApiKey | None) -> ModelCard:
    return ModelCard(
        id=settings.model_name,
        max_tokens_limit=settings.max_tokens_limit,
        default_max_tokens=default_max_tokens(settings, key),
    )


@router.get("/v1/models")
async def list_models(key: ApiKeyDep, settings: SettingsDep) -> ModelList:
    return ModelList(data=[_card(settings, key)])


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, key: ApiKeyDep, settings: SettingsDep) -> ModelCard:
    if model_id != settings.model_name:
        raise errors.model_not_found(model_id)
    return _card(settings, key)
