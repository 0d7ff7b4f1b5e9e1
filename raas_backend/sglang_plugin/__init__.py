"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``raas``).

SGLang calls `register()` in the launcher, the engine and every scheduler process. It
lets SGLang run on the CPU without sgl-kernel, registers `--attention-backend raas`
(the backend class is imported lazily, inside the factory), installs the scheduler
hooks that evict and free slots, sizes admission by each request's bounded KV
(admission.py), validates `custom_params.kv_policy` where SGLang
validates sampling parameters, so a bad value is a 400 and never a crashed scheduler, and
reports each finished request's KV statistics (`meta_info["raas_kv_cache"]`, OpenAI
`usage.kv_cache`; see usage_report.py).
"""

from __future__ import annotations

BACKEND_NAME = "raas"


def _create_backend(model_runner):
    from raas_backend.sglang_plugin.backend import RaasAttnBackend

    return RaasAttnBackend(model_runner)


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from raas_backend.sglang_plugin import (
        admission,
        request_validation,
        scheduler_hooks,
        usage_report,
    )
    from raas_backend.sglang_plugin.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    register_attention_backend(BACKEND_NAME)(_create_backend)
    add_attention_backend_choices([BACKEND_NAME])

    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.maybe_evict_swa",
        scheduler_hooks.before_decode_alloc,
        HookType.BEFORE,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row",
        scheduler_hooks.around_free_kv_row,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.common.release_kv_cache",
        scheduler_hooks.around_release_kv_cache,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.pool_stats_observer.kv_private_tokens",
        scheduler_hooks.around_kv_private_tokens,
        HookType.AROUND,
    )
    if admission.admission_enabled():
        adder = "sglang.srt.managers.schedule_policy.PrefillAdder"
        HookRegistry.register(f"{adder}.__init__", admission.around_adder_init, HookType.AROUND)
        for method in ("add_one_req", "add_chunked_req", "preempt_to_schedule"):
            HookRegistry.register(f"{adder}.{method}", admission.around_adder_add, HookType.AROUND)
        HookRegistry.register(
            "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
            admission.around_init_req_max_new_tokens,
            HookType.AROUND,
        )
    HookRegistry.register(
        "sglang.srt.sampling.sampling_params.SamplingParams.verify",
        request_validation.after_verify,
        HookType.AFTER,
    )
    # KV statistics per finished request: scheduler -> meta_info -> OpenAI usage.
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class",
        usage_report.around_get_output_streamer_class,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
        usage_report.around_update_request_meta_info,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request",
        usage_report.around_generate_request,
        HookType.AROUND,
    )
    chat = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
    completion = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion"
    HookRegistry.register(
        f"{chat}._build_chat_response", usage_report.after_build_response, HookType.AFTER
    )
    HookRegistry.register(
        f"{chat}._generate_chat_stream", usage_report.around_stream, HookType.AROUND
    )
    HookRegistry.register(
        f"{completion}._build_completion_response",
        usage_report.after_build_response,
        HookType.AFTER,
    )
    HookRegistry.register(
        f"{completion}._generate_completion_stream", usage_report.around_stream, HookType.AROUND
    )
