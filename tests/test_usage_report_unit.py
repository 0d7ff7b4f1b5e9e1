"""The KV-usage report's pieces without an engine (the real path: test_usage_report_engine)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang.srt.entrypoints.openai.protocol import (  # noqa: E402
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    UsageInfo,
)
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH  # noqa: E402
from sglang.srt.managers.scheduler_components.output_streamer import (  # noqa: E402
    SchedulerOutputStreamer,
)
from sglang.srt.utils.json_response import model_json_response  # noqa: E402

from raas_backend.policies import KVPolicyConfig  # noqa: E402
from raas_backend.sglang_plugin import usage_report as ur  # noqa: E402
from raas_backend.sglang_plugin.runtime import RaasRuntime  # noqa: E402

STATS = {
    "policy": "raas",
    "budget_tokens": 32,
    "alpha": 0.1,
    "retained_tokens": 40,
    "peak_retained_tokens": 50,
    "dense_equivalent_tokens": 100,
    "evicted_pages": 3,
}
KV = {k: v for k, v in STATS.items() if k != "retained_tokens"}


def chat_response() -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id="chatcmpl-1",
        model="m",
        choices=[
            ChatCompletionResponseChoice(
                index=0, message=ChatMessage(role="assistant", content="hi"), finish_reason="stop"
            )
        ],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )


def usage_chunk() -> str:
    usage = UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    chunk = ChatCompletionStreamResponse(id="x", model="m", choices=[], usage=usage)
    return f"data: {chunk.model_dump_json()}\n\n"


@pytest.mark.parametrize("policy", ["h2o", "streaming", "quest", "dense"])
def test_alpha_is_reported_only_for_the_policy_that_reads_it(policy):
    assert ur.kv_cache_usage([{**STATS, "policy": policy}])["alpha"] is None
    assert ur.kv_cache_usage([STATS])["alpha"] == STATS["alpha"]


def test_kv_cache_usage_sums_choices_and_needs_every_report():
    assert ur.kv_cache_usage([STATS]) == KV
    two = ur.kv_cache_usage([STATS, STATS])
    doubled = {"peak_retained_tokens": 100, "dense_equivalent_tokens": 200, "evicted_pages": 6}
    assert two == {**KV, **doubled}
    assert ur.kv_cache_usage([]) is None
    assert ur.kv_cache_usage([STATS, None]) is None


def test_non_stream_response_gains_usage_kv_cache_and_nothing_else():
    resp = chat_response()
    out = ur.after_build_response(resp, None, None, [{"meta_info": {ur.META_KEY: STATS}}], 0)
    assert isinstance(out, ChatCompletionResponse)
    body = json.loads(model_json_response(out).body)
    assert body["usage"].pop("kv_cache") == KV
    assert body == json.loads(resp.model_dump_json(by_alias=True))
    # No report (another backend): the response is left alone.
    assert ur.after_build_response(resp, None, None, [{"meta_info": {}}], 0) is None


def test_only_the_final_usage_chunk_gains_kv_cache():
    final = usage_chunk()
    out = ur.usage_chunk_with_kv_cache(final, {0: STATS})
    body = json.loads(out.removeprefix("data: "))
    assert body["usage"].pop("kv_cache") == KV
    assert body == json.loads(final.removeprefix("data: "))
    content = 'data: {"choices":[{"index":0,"delta":{"content":"\\"usage\\""}}],"usage":{}}\n\n'
    for chunk in (content, "data: [DONE]\n\n"):
        assert ur.usage_chunk_with_kv_cache(chunk, {0: STATS}) == chunk


def test_meta_info_gets_one_dict_and_other_keys_pass_through():
    calls = []

    def original(manager, meta_info, state, customized_info, index, finish_reason):
        calls.append(customized_info)

    meta: dict = {}
    info = {ur.META_KEY: [[], [STATS]], "other": [[1], [2]]}
    ur.around_update_request_meta_info(original, None, meta, None, info, 1, None)
    assert meta == {ur.META_KEY: STATS} and calls == [{"other": [[1], [2]]}]
    meta = {}
    ur.around_update_request_meta_info(original, None, meta, None, info, 0, None)
    assert meta == {}
    plain = {"other": [[1]]}
    ur.around_update_request_meta_info(original, None, meta, None, plain, 0, None)
    assert calls[-1] is plain


def fake_req(rid: str, finished_reason=None, prompt_len: int = 10) -> SimpleNamespace:
    return SimpleNamespace(
        rid=rid,
        finished_reason=finished_reason,
        finished=lambda: finished_reason is not None,
        origin_input_ids=list(range(prompt_len)),
        sampling_params=SimpleNamespace(custom_params={"kv_policy": {"name": "dense"}}),
    )


def test_streamer_reports_each_finished_request_once(monkeypatch):
    runtime = RaasRuntime(defaults=KVPolicyConfig())
    monkeypatch.setattr(ur, "current_runtime", lambda: runtime)
    runtime.finished["done"] = STATS
    cls = ur.reporting_streamer_class(SchedulerOutputStreamer)
    streamer = cls(
        send_to_detokenizer=None,
        tree_cache=None,
        server_args=None,
        is_generation=True,
        spec_algorithm=None,
        disaggregation_mode=None,
        enable_hicache_storage=lambda: False,
    )
    length = FINISH_LENGTH(length=1)
    reqs = [
        fake_req("running"),
        fake_req("done", length),
        fake_req("one-token", length, prompt_len=7),
        fake_req("aborted", FINISH_ABORT()),
    ]
    info = streamer.build_additional_customized_info(reqs)
    running, done, one_token, aborted = info[ur.META_KEY]
    assert (running, done, aborted) == ([], [STATS], [])
    (prompt_only,) = one_token
    assert prompt_only["policy"] == "dense" and prompt_only["evicted_pages"] == 0
    assert prompt_only["peak_retained_tokens"] == prompt_only["dense_equivalent_tokens"] == 7
    assert "done" not in runtime.finished
    assert streamer.build_additional_customized_info([fake_req("running")]) == {}


def test_scheduler_keeps_its_streamer_without_the_raas_runtime(monkeypatch):
    scheduler = SimpleNamespace(is_generation=True, rust_server=None)
    original = lambda self: SchedulerOutputStreamer  # noqa: E731
    monkeypatch.setattr(ur, "current_runtime", lambda: None)
    assert ur.around_get_output_streamer_class(original, scheduler) is SchedulerOutputStreamer
    monkeypatch.setattr(ur, "current_runtime", lambda: RaasRuntime(defaults=KVPolicyConfig()))
    assert ur.around_get_output_streamer_class(original, scheduler) is not SchedulerOutputStreamer


def test_stream_wrappers_collect_and_inject_only_for_raas():
    final = usage_chunk()

    async def generate_request(manager, obj, request=None):
        yield {"text": "a", "meta_info": {}}
        yield {"text": "b", "meta_info": {ur.META_KEY: STATS}}

    async def chat_stream(serving, adapted_request, request, raw_request):
        outputs = ur.around_generate_request(generate_request, None, adapted_request)
        async for out in outputs:
            yield f"data: {json.dumps({'choices': [{'delta': {'content': out['text']}}]})}\n\n"
        yield final
        yield "data: [DONE]\n\n"

    async def run(backend: str) -> tuple[object, list[str]]:
        tm = SimpleNamespace(server_args=SimpleNamespace(attention_backend=backend))
        serving = SimpleNamespace(tokenizer_manager=tm)
        gen = ur.around_stream(chat_stream, serving, object(), None, None)
        return gen, [chunk async for chunk in gen]

    gen, chunks = asyncio.run(run("raas"))
    assert json.loads(chunks[2].removeprefix("data: "))["usage"]["kv_cache"] == KV
    assert chunks[:2] == [
        'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
        'data: {"choices": [{"delta": {"content": "b"}}]}\n\n',
    ]
    assert not ur._STREAM_SINKS
    gen, chunks = asyncio.run(run("torch_native"))
    assert gen.ag_code is chat_stream.__code__ and chunks[2] == final
