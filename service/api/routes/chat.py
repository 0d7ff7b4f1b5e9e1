from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.deps import ApiKeyDep, ChatServiceDep, SettingsDep
from service.api.errors import ErrorBody
from service.api.schemas import ChatCompletionRequest
from service.chat.input import read_chat_body
from service.server.settings import Settings

router = APIRouter(tags=["chat"])

CHAT_PATH = "/v1/chat/completions"


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
            # A discriminator's mapping names `#/$defs/...` too, and the definitions are
            # inlined: `propertyName` alone says how to pick the branch.
            return {
                key: {"propertyName": value["propertyName"]}
                if key == "discriminator" and isinstance(value, dict) and "propertyName" in value
                else resolve(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


# The body is read and checked by service/chat/input.py (strict JSON, a size bound, one
# 400 per bad field), not by FastAPI, so its schema is documented here.
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_defs(ChatCompletionRequest.model_json_schema())}
        },
    },
}


def document_limits(doc: dict[str, Any], settings: Settings) -> None:
    """Write this server's limits into its OpenAPI document, so that the schema bounds
    what `chat_request.check_values` enforces (the static schema knows only the floor)."""
    body = doc["paths"][CHAT_PATH]["post"]["requestBody"]["content"]["application/json"]
    fields = body["schema"]["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        fields[name]["maximum"] = settings.max_tokens_limit
    fields["n"]["maximum"] = settings.max_n
    policy = fields["kv_policy"]["anyOf"][0]["properties"]
    policy["name"]["enum"] = list(settings.kv_allowed_policies)
    budget = policy["budget_tokens"]
    budget["minimum"] = settings.kv_min_budget_tokens
    budget["maximum"] = settings.kv_max_budget_tokens
    if not settings.engine_honours_seed:
        fields["seed"] = {"type": "null", "description": "Not supported here (a 400)"}


# Every error is OpenAI's `{"error": {...}}` (service/api/errors.py).
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "An invalid field value (`param` names it)"),
        (401, "Missing or unknown API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (415, "Content-Type is not `application/json` (UTF-8)"),
        (422, "Body is not valid JSON or does not match the schema"),
        (429, "Admission queue full, queue timeout or per-key limit; see Retry-After"),
        (503, "Engine down, starting or restarting, or the gateway draining"),
        (504, "The engine stayed silent past the upstream timeout"),
    )
}


@router.post(CHAT_PATH, response_model=None, responses=_ERRORS, openapi_extra=_OPENAPI)
async def create_chat_completion(
    request: Request, key: ApiKeyDep, settings: SettingsDep, chat: ChatServiceDep
) -> Response:
    """OpenAI chat completions plus the `kv_policy` extension (see docs/api.md)."""
    body = await read_chat_body(request, settings.max_request_bytes)
    return await chat.complete(request, body, key)
