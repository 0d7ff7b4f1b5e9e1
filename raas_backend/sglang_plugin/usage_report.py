"""Report each finished request's KV statistics to the client.

The numbers live in the scheduler process (`RaasRuntime.finished`, stored when the
request's KV is released, which SGLang does before it streams the request's last
output); the responses are built in the HTTP process. The way between them is SGLang's
own channel for extra per-request output, `customized_info`:

- Scheduler: around `Scheduler.get_output_streamer_class`, a `raas` scheduler gets a
  subclass of SGLang's output streamer whose `build_additional_customized_info` gives
  each request in its final output its stats, under `raas_kv_cache`.
- HTTP process, around `TokenizerManager.update_request_meta_info`: that value becomes
  `meta_info["raas_kv_cache"]`, one dict (what /generate returns), kept out of SGLang's
  per-token accumulation.
- OpenAI responses: after `_build_chat_response` / `_build_completion_response` the
  response gets `usage.kv_cache`; around `_generate_chat_stream` /
  `_generate_completion_stream` (with `TokenizerManager.generate_request`, which feeds
  them) the final usage chunk gets it. With `n > 1` (or several prompts) the counts are
  summed over the choices.

`usage.kv_cache` has the shape the gateway expects: policy, budget_tokens, alpha (null
for a policy that does not use it), peak_retained_tokens, dense_equivalent_tokens,
evicted_pages. The two token counts count the same thing, positions whose K and V were
written: dense-equivalent is every position a dense cache holds at the end (prompt +
completion - 1 per choice, since the last sampled token is never fed back), peak-retained
the most the policy held at once, so their ratio is the memory saved. Every hook is a no-op
unless the engine runs the `raas` backend: the scheduler side checks for the runtime,
the HTTP side for the key in the data (and the streaming wrappers for the server's
attention backend).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from raas_backend.sglang_plugin import BACKEND_NAME
from raas_backend.sglang_plugin.runtime import RaasRuntime, current_runtime

#: The customized_info key (scheduler -> HTTP process) and the meta_info key.
META_KEY = "raas_kv_cache"
#: The key under the OpenAI response's `usage`.
USAGE_KEY = "kv_cache"
POLICY_FIELDS = ("policy", "budget_tokens", "alpha")
COUNT_FIELDS = ("peak_retained_tokens", "dense_equivalent_tokens", "evicted_pages")
#: The policies whose eviction rule reads alpha.
ALPHA_POLICIES = frozenset({"raas"})

# --- scheduler process -------------------------------------------------------------


def final_stats(runtime: RaasRuntime, req: Any) -> dict[str, Any] | None:
    """The stats of a request whose last output is being streamed now."""
    stats = runtime.take_finished(req.rid)
    if stats is not None:
        return stats
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if isinstance(req.finished_reason, FINISH_ABORT):
        return None
    # Finished at prefill (one token, or a stop at the first one): it never decoded,
    # so the runtime never tracked it; only its prompt was held.
    return runtime.prompt_only_stats(
        getattr(req.sampling_params, "custom_params", None), len(req.origin_input_ids)
    )


def customized_info_for(runtime: RaasRuntime, reqs: list[Any]) -> list[list[Any]] | None:
    """One value per streamed request: [stats] for a finished one, else []; None when
    no request of this output has finished (the output then carries no key)."""
    values: list[list[Any]] = []
    reported = False
    for req in reqs:
        stats = final_stats(runtime, req) if req.finished() else None
        values.append([stats] if stats is not None else [])
        reported = reported or stats is not None
    return values if reported else None


@functools.cache
def reporting_streamer_class(base: type) -> type:
    """`base` (SGLang's output streamer class) plus the per-request KV stats."""
    base_reports = bool(base.has_additional_customized_info)

    class RaasReportingOutputStreamer(base):  # type: ignore[misc, valid-type]
        has_additional_customized_info = True

        def should_build_additional_customized_info(self) -> bool:
            return True

        def build_additional_customized_info(self, reqs: list[Any]) -> dict[str, list]:
            info: dict[str, list] = {}
            if base_reports and base.should_build_additional_customized_info(self):
                info.update(base.build_additional_customized_info(self, reqs))
            runtime = current_runtime()
            values = customized_info_for(runtime, reqs) if runtime is not None else None
            if values is not None:
                info[META_KEY] = values
            return info

    RaasReportingOutputStreamer.__qualname__ = f"RaasReporting{base.__qualname__}"
    return RaasReportingOutputStreamer


def around_get_output_streamer_class(original, scheduler: Any, *args: Any, **kwargs: Any):
    cls = original(scheduler, *args, **kwargs)
    if (
        current_runtime() is None
        or not getattr(scheduler, "is_generation", True)
        # SGLang's Rust egress does not carry additional customized info.
        or getattr(scheduler, "rust_server", None) is not None
    ):
        return cls
    return reporting_streamer_class(cls)


# --- HTTP process: meta_info ---------------------------------------------------------


def around_update_request_meta_info(
    original,
    manager: Any,
    meta_info: dict,
    state: Any,
    customized_info: dict,
    index: int,
    *args: Any,
    **kwargs: Any,
) -> None:
    if not isinstance(customized_info, dict) or META_KEY not in customized_info:
        return original(manager, meta_info, state, customized_info, index, *args, **kwargs)
    reported = customized_info[META_KEY][index]
    if reported:
        meta_info[META_KEY] = reported[-1]
    rest = {key: values for key, values in customized_info.items() if key != META_KEY}
    if rest:
        original(manager, meta_info, state, rest, index, *args, **kwargs)
    return None


# --- HTTP process: OpenAI usage ------------------------------------------------------


def kv_cache_usage(reported: Iterable[Any]) -> dict[str, Any] | None:
    """`usage.kv_cache` from the stats of every choice; None unless all reported."""
    stats = list(reported)
    if not stats or not all(isinstance(s, dict) for s in stats):
        return None
    usage = {field: stats[0].get(field) for field in POLICY_FIELDS}
    if usage["policy"] not in ALPHA_POLICIES:
        # Its configuration carries a default alpha, but nothing reads it.
        usage["alpha"] = None
    for field in COUNT_FIELDS:
        usage[field] = sum(int(s.get(field) or 0) for s in stats)
    return usage


@functools.cache
def _usage_class() -> type:
    from pydantic import create_model
    from sglang.srt.entrypoints.openai.protocol import UsageInfo

    return create_model(
        "UsageInfoWithKvCache", __base__=UsageInfo, kv_cache=(dict[str, Any] | None, None)
    )


@functools.cache
def _response_class(base: type) -> type:
    from pydantic import create_model

    # The response serializes `usage` by its declared type: declare the one with kv_cache.
    return create_model(f"{base.__name__}WithKvCache", __base__=base, usage=(_usage_class(), ...))


def with_kv_cache(response: Any, kv: dict[str, Any]) -> Any:
    """The same response (a subclass of its type) whose `usage` carries `kv_cache`."""
    usage = response.usage
    new_usage = _usage_class().model_construct(
        _fields_set={*usage.model_fields_set, USAGE_KEY}, **{**dict(usage), USAGE_KEY: kv}
    )
    fields = dict(response)
    fields["usage"] = new_usage
    return _response_class(type(response)).model_construct(
        _fields_set=set(response.model_fields_set), **fields
    )


def after_build_response(result: Any, serving: Any, request: Any, ret: Any, *a, **kw) -> Any:
    """After `_build_chat_response` / `_build_completion_response`."""
    if getattr(result, "usage", None) is None or not isinstance(ret, list) or not ret:
        return None
    kv = kv_cache_usage((item.get("meta_info") or {}).get(META_KEY) for item in ret)
    return with_kv_cache(result, kv) if kv is not None else None


# Streams whose final stats are being collected: id(adapted request) -> {index: stats}.
_STREAM_SINKS: dict[int, dict[int, Any]] = {}


def serves_raas(tokenizer_manager: Any) -> bool:
    args = getattr(tokenizer_manager, "server_args", None)
    return any(
        getattr(args, name, None) == BACKEND_NAME
        for name in ("attention_backend", "decode_attention_backend", "prefill_attention_backend")
    )


def around_generate_request(original, manager: Any, obj: Any, *args: Any, **kwargs: Any):
    outputs = original(manager, obj, *args, **kwargs)
    sink = _STREAM_SINKS.get(id(obj))
    return outputs if sink is None else _collect_stats(outputs, sink)


async def _collect_stats(outputs: Any, sink: dict[int, Any]) -> AsyncIterator[Any]:
    try:
        async for out in outputs:
            meta_info = out.get("meta_info") if isinstance(out, dict) else None
            if meta_info and META_KEY in meta_info:
                sink[out.get("index", 0)] = meta_info[META_KEY]
            yield out
    finally:
        await outputs.aclose()


def around_stream(original, serving: Any, adapted_request: Any, *args: Any, **kwargs: Any):
    """Around `_generate_chat_stream` / `_generate_completion_stream`."""
    chunks = original(serving, adapted_request, *args, **kwargs)
    if not serves_raas(getattr(serving, "tokenizer_manager", None)):
        return chunks
    return _add_kv_cache_to_usage_chunk(chunks, adapted_request)


async def _add_kv_cache_to_usage_chunk(chunks: Any, adapted_request: Any) -> AsyncIterator[Any]:
    key = id(adapted_request)
    sink: dict[int, Any] = {}
    _STREAM_SINKS[key] = sink
    try:
        async for chunk in chunks:
            if sink and isinstance(chunk, str):
                chunk = usage_chunk_with_kv_cache(chunk, sink)
            yield chunk
    finally:
        if _STREAM_SINKS.get(key) is sink:
            del _STREAM_SINKS[key]
        await chunks.aclose()


def usage_chunk_with_kv_cache(chunk: str, sink: dict[int, Any]) -> str:
    """The SSE event unchanged, unless it is the final usage chunk (no choices)."""
    prefix = "data: "
    if not chunk.startswith(prefix) or '"usage"' not in chunk:
        return chunk
    try:
        body = json.loads(chunk[len(prefix) :])
    except ValueError:
        return chunk
    if not isinstance(body, dict) or body.get("choices") != []:
        return chunk
    usage = body.get("usage")
    kv = kv_cache_usage(sink[i] for i in sorted(sink))
    if not isinstance(usage, dict) or kv is None:
        return chunk
    usage[USAGE_KEY] = kv
    return f"{prefix}{json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
