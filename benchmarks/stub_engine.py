"""A stand-in for SGLang's `/v1/chat/completions` that answers at once with canned tokens.

For `gateway_overhead.py --engine stub`: with no model behind it, the difference between
the arms is the gateway's own cost, free of engine noise (and it needs no heavy-process
lock). It honours `max_tokens`, `stream` and `stream_options.include_usage`; everything
else in the request is ignored.

`STUB_DELAY_MS` makes it wait before answering (before the first chunk of a stream), as a
model's prefill and decode would: a gateway left idle that long runs its next request's
code cold, which is what one request at a time against a real engine pays.
`STUB_TOKEN_DELAY_MS` spaces a stream's token chunks as decode steps would, so that each
chunk reaches an idle gateway; the finish reason, usage chunk and `[DONE]` follow the
last token at once, as SGLang writes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PROMPT_TOKENS = 30
TOKEN = "word "
DELAY_S = float(os.environ.get("STUB_DELAY_MS", "0")) / 1000
TOKEN_DELAY_S = float(os.environ.get("STUB_TOKEN_DELAY_MS", "0")) / 1000


def usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def chunk(rid: str, created: int, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "stub",
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


async def chat(request: Request) -> Response:
    body = await request.json()
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    rid = str(body.get("rid") or "stub")
    created = int(time.time())
    if DELAY_S > 0:
        await asyncio.sleep(DELAY_S)
    if not body.get("stream"):
        message = {"role": "assistant", "content": TOKEN * n}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": "stub",
                "choices": [choice],
                "usage": usage(n),
            }
        )
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        for i in range(n):
            if i and TOKEN_DELAY_S > 0:
                await asyncio.sleep(TOKEN_DELAY_S)
            delta = {"index": 0, "delta": {"content": TOKEN}, "finish_reason": None}
            yield chunk(rid, created, [delta])
        # As SGLang does: the finish reason in a chunk of its own, then the usage chunk
        # and [DONE], each its own write, back to back.
        yield chunk(rid, created, [{"index": 0, "delta": {}, "finish_reason": "length"}])
        if with_usage:
            yield chunk(rid, created, [], usage=usage(n))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def healthy(_: Request) -> Response:
    return Response(status_code=200)


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", healthy),
        Route("/health_generate", healthy),
        Route("/model_info", healthy),
    ]
)
