from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.deps import ApiKeyDep, ChatBodyDep, ChatServiceDep
from service.schemas import ChatCompletionRequest

router = APIRouter(tags=["chat"])

# The body is read by hand (size limit first, then parse), so FastAPI cannot infer it.
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
    }
}


@router.post("/v1/chat/completions", response_model=None, openapi_extra=_BODY_DOC)
async def create_chat_completion(
    request: Request, key: ApiKeyDep, body: ChatBodyDep, chat: ChatServiceDep
) -> Response:
    """OpenAI chat completions plus the `kv_policy` extension (see docs/api.md)."""
    return await chat.complete(request, body, key)
