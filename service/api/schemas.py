"""Pydantic models at the HTTP edge: the chat request as the gateway accepts it, and the
small responses the gateway builds itself.

The chat model checks *shape* (types, required fields); a shape error is a 422. Value
checks (ranges, caps, the model name) live in `chat_request.py` and answer 400, like
OpenAI does for a well-formed request with a bad value.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.chat.kv_policy import request_json_schema


class _Strict(BaseModel):
    """Strict at the edge: "10" is not an integer and true is not 1 (a float field still
    takes an integer: JSON has one number type); a key the model lacks is refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


# The served models read text only: an image or audio part has nowhere to go.
TextContent = str | list[TextPart]


class _TextMessage(_Strict):
    content: TextContent
    name: str | None = None


class SystemMessage(_TextMessage):
    role: Literal["system"]


class DeveloperMessage(_TextMessage):
    role: Literal["developer"]


class UserMessage(_TextMessage):
    role: Literal["user"]


class FunctionCall(_Strict):
    name: str
    # A JSON document as text, as OpenAI sends it.
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # SGLang's extension: earlier thinking text of a reasoning model.
    reasoning_content: str | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # A JSON Schema object; the engine reads it.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow BaseModel.schema; the JSON name stays `schema`.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


def _kv_policy(schema: dict[str, Any]) -> None:
    schema.update(request_json_schema())


def _integral(value: Any) -> Any:
    # JSON Schema counts 1.0 as an integer; so does the gateway. 1.5, "1" and true are not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema defines it.
Int = Annotated[int, BeforeValidator(_integral)]


def _range(low: float | None = None, high: float | None = None, *, exclusive_low: bool = False):
    """The allowed range, for the OpenAPI document only: `chat_request.check_values`
    enforces it, so that a value out of range is a 400 naming the field (OpenAI's way),
    not a schema error."""
    bounds: dict[str, float] = {}
    if low is not None:
        bounds["exclusiveMinimum" if exclusive_low else "minimum"] = low
    if high is not None:
        bounds["maximum"] = high
    return Field(default=None, json_schema_extra=bounds)  # type: ignore[arg-type]


class ChatCompletionRequest(_Strict):
    """OpenAI's chat request, SGLang's safe sampling extensions and `kv_policy`.

    Nothing else is accepted: an unknown top-level field is a 400 `unknown_parameter`
    (`rid` and `custom_params` are the gateway's to set), a wrong type a 422.
    """

    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = _range(1)
    max_completion_tokens: Int | None = _range(1)
    temperature: float | None = _range(0, 2)
    top_p: float | None = _range(0, 1, exclusive_low=True)
    n: Int | None = _range(1)
    seed: Int | None = _range(-(2**63), 2**63 - 1)
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = _range(0, 20)
    frequency_penalty: float | None = _range(-2, 2)
    presence_penalty: float | None = _range(-2, 2)
    # Token id (as a string) -> bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # SGLang's sampling extensions.
    top_k: Int | None = None
    min_p: float | None = _range(0, 1)
    min_tokens: Int | None = _range(0)
    repetition_penalty: float | None = _range(0, 2, exclusive_low=True)
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool | None = None
    no_stop_trim: bool | None = None
    skip_special_tokens: bool | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI fields that mean nothing to a self-hosted engine: accepted, never forwarded.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Validated by kv_policy.py so that every problem in it is a 400 naming the field.
    kv_policy: Any = Field(default=None, json_schema_extra=_kv_policy)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raas-serve"
    # For the caller: the largest max_tokens it may ask for, and the cap its requests get
    # when they set none (null: the engine's, up to the context length).
    max_tokens_limit: int
    default_max_tokens: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    engine_mode: str
    engine_state: str
    engine_restarts: int
