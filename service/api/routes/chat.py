from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.deps import ApiKeyDep, ChatBodyDep, ChatServiceDep
from service.schemas import ChatCompletionRequest

router = APIRouter(tags=["chat"])


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace pydantic's `#/$defs/...` references by the definitions themselves.

    Embedded in the OpenAPI document, such a reference points at the document's root,
    where no `$defs` exist: schema-driven clients and fuzzers could not resolve it.
    """
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**resolve(defs[ref.removeprefix("#/$defs/")]), **resolve(rest)}
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


# The body is read by hand (size limit first, then parse), so FastAPI cannot infer it.
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_defs(ChatCompletionRequest.model_json_schema())}
        },
    }
}


@router.post("/v1/chat/completions", response_model=None, openapi_extra=_BODY_DOC)
async def create_chat_completion(
    request: Request, key: ApiKeyDep, body: ChatBodyDep, chat: ChatServiceDep
) -> Response:
    """OpenAI chat completions plus the `kv_policy` extension (see docs/api.md)."""
    return await chat.complete(request, body, key)
