"""Every place the raas plugin reaches into SGLang internals, declared once.

SGLang's plugin hooks patch whatever dotted path they are given and its registry only
logs a target it cannot resolve, so an SGLang release that renames a method or adds a
parameter would surface later as a scheduler crash or, worse, as silent KV corruption.
Each entry here names its target, what the plugin does with it, and the parameters the
plugin relies on (names, in order). `check_hooks` compares them with the installed
SGLang before `register()` installs anything, and reports every mismatch at once.

What must match follows from the hook's own use of its arguments: a hook that passes
`*args` through needs only the leading parameters it names or reads by position; a hook
with a fixed argument list needs the target's positional parameters exactly, and one
without `**kwargs` needs a target without keyword-only parameters. A method the plugin
overrides (`exact`) must keep exactly the parameters SGLang calls it with.
"""

from __future__ import annotations

import enum
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from raas_backend.sglang_plugin import (
    admission,
    request_validation,
    scheduler_hooks,
    server_requirements,
    usage_report,
)
from raas_backend.sglang_plugin.cpu_support import ROTARY_CPU_FLAG

#: The SGLang release every entry was read from.
TARGET_SGLANG_VERSION = "0.5.23"


class Kind(enum.Enum):
    # Installed through SGLang's HookRegistry (the names match its HookType).
    BEFORE = "before"
    AFTER = "after"
    AROUND = "around"
    #: An SGLang function the plugin calls.
    CALL = "call"
    #: A method the plugin overrides in a subclass of an SGLang class.
    OVERRIDE = "override"
    #: A module or class attribute the plugin reads or sets.
    ATTRIBUTE = "attribute"


PATCHES = (Kind.BEFORE, Kind.AFTER, Kind.AROUND)


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Hook:
    target: str
    kind: Kind
    why: str
    #: The target's leading parameters the plugin relies on, `self` included.
    params: tuple[str, ...] = ()
    #: The hook installed on the target (BEFORE / AFTER / AROUND only).
    fn: Callable[..., Any] | None = None
    #: The target must be an async generator function (its result is iterated).
    async_gen: bool = False
    #: For ATTRIBUTE entries: the type the value must have.
    attr_type: type | None = None
    #: The target takes exactly `params` positionally (an override SGLang calls).
    exact: bool = False
    #: Whether `register()` installs (and so checks) the entry in this process.
    enabled: Callable[[], bool] = _always


_SCHED_BATCH = "sglang.srt.managers.schedule_batch"
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
_COMPLETION = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion"
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_OVERRIDES = "sglang.srt.arg_groups.overrides"
CHOICES = "sglang.srt.arg_groups.choices.add_attention_backend_choices"
#: Runs in the launcher after resolution, before any scheduler process is spawned.
CHECK_SERVER_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"
_ATTENTION = "sglang.srt.layers.attention"
_BASE_BACKEND = f"{_ATTENTION}.base_attn_backend.AttentionBackend"
_TORCH_BACKEND = f"{_ATTENTION}.torch_native_backend.TorchNativeAttnBackend"
_FI_BACKEND = f"{_ATTENTION}.flashinfer_backend.FlashInferAttnBackend"

HOOKS: tuple[Hook, ...] = (
    # --- registration and CPU enablement ------------------------------------------------
    Hook(
        "sglang.srt.layers.attention.attention_registry.register_attention_backend",
        Kind.CALL,
        "registers the `raas` backend factory by name",
        params=("name",),
    ),
    Hook(
        CHOICES,
        Kind.CALL,
        "adds `raas` to the --*attention-backend CLI choices",
        params=("iterable",),
    ),
    Hook(
        ROTARY_CPU_FLAG,
        Kind.ATTRIBUTE,
        "set True without CUDA so rotary embedding takes its torch path (no sgl-kernel)",
        attr_type=bool,
    ),
    # --- start-up checks ------------------------------------------------------------------
    Hook(
        CHECK_SERVER_ARGS,
        Kind.AFTER,
        "refuses unsupported settings in the launcher, before any scheduler is spawned",
        params=("self",),
        fn=server_requirements.after_check_server_args,
    ),
    Hook(
        f"{_OVERRIDES}.resolved_view",
        Kind.CALL,
        "reads the resolved settings (raw ServerArgs fields hold the operator's input)",
        params=("server_args",),
    ),
    *(
        Hook(
            f"sglang.srt.server_args.ServerArgs.{field}",
            Kind.ATTRIBUTE,
            "a setting the start-up check reads",
        )
        for field in server_requirements.FIELDS_READ
    ),
    # --- the attention-backend interface the two raas backends override ----------------------
    Hook(
        f"{_BASE_BACKEND}.init_cuda_graph_state",
        Kind.OVERRIDE,
        "decode CUDA graphs need it; the start-up check asks whether raas implements it",
        params=("self", "max_bs", "max_num_tokens"),
        exact=True,
    ),
    Hook(
        f"{_BASE_BACKEND}.init_forward_metadata_in_graph",
        Kind.OVERRIDE,
        "RaasFlashInferBackend: the in-graph part of a decode step",
        params=("self", "forward_batch"),
        exact=True,
    ),
    *(
        Hook(
            f"{base}.__init__",
            Kind.OVERRIDE,
            f"{ours} is built from the model runner alone",
            params=("self", "model_runner"),
        )
        for base, ours in (
            (_TORCH_BACKEND, "RaasAttnBackend"),
            (_FI_BACKEND, "RaasFlashInferBackend"),
        )
    ),
    *(
        Hook(
            f"{base}.init_forward_metadata",
            Kind.OVERRIDE,
            "one step's decode lists are built once, for every layer",
            params=("self", "forward_batch"),
            exact=True,
        )
        for base in (_TORCH_BACKEND, _FI_BACKEND)
    ),
    Hook(
        f"{_FI_BACKEND}.init_forward_metadata_out_graph",
        Kind.OVERRIDE,
        "RaasFlashInferBackend: plans FlashInfer once per step, outside the graph",
        params=("self", "forward_batch", "in_capture"),
        exact=True,
    ),
    *(
        Hook(
            f"{base}.forward_decode",
            Kind.OVERRIDE,
            "decode attends over the prompt, the retained pages and the tail",
            params=("self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache"),
            exact=True,
        )
        for base in (_TORCH_BACKEND, _FI_BACKEND)
    ),
    Hook(
        f"{_OVERRIDES}.model_config_of",
        Kind.CALL,
        "the model's attention architecture, checked before weights load",
        params=("server_args",),
    ),
    # --- eviction and slot accounting (scheduler) ------------------------------------------
    Hook(
        f"{_SCHED_BATCH}.ScheduleBatch.maybe_evict_swa",
        Kind.BEFORE,
        "top of every decode allocation: evict pages over budget, free their slots",
        params=("self",),
        fn=scheduler_hooks.before_decode_alloc,
    ),
    Hook(
        "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row",
        Kind.AROUND,
        "the finish-time free skips evicted positions: no double free",
        params=("self", "kv", "ranges"),
        fn=scheduler_hooks.around_free_kv_row,
    ),
    Hook(
        "sglang.srt.mem_cache.common.release_kv_cache",
        Kind.AROUND,
        "drops a request's state at finish/abort, keeps it aside on retraction",
        params=("req",),
        fn=scheduler_hooks.around_release_kv_cache,
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.pool_stats_observer.kv_private_tokens",
        Kind.AROUND,
        "SGLang's leak check counts what a request really holds after eviction",
        params=("kv", "page_size"),
        fn=scheduler_hooks.around_kv_private_tokens,
    ),
    # --- budget-aware admission --------------------------------------------------------------
    Hook(
        f"{_ADDER}.__init__",
        Kind.AROUND,
        "admission arithmetic sees bounded growth (reads running_batch by position)",
        params=("self", "page_size", "tree_cache", "token_to_kv_pool_allocator", "running_batch"),
        fn=admission.around_adder_init,
        enabled=admission.admission_enabled,
    ),
    *(
        Hook(
            f"{_ADDER}.{method}",
            Kind.AROUND,
            "admission arithmetic sees bounded growth",
            params=("self", "req"),
            fn=admission.around_adder_add,
            enabled=admission.admission_enabled,
        )
        for method in ("add_one_req", "add_chunked_req", "preempt_to_schedule")
    ),
    Hook(
        f"{_SCHEDULER}.init_req_max_new_tokens",
        Kind.AROUND,
        "a bounded request keeps its max_new_tokens instead of the pool clip",
        params=("self", "req"),
        fn=admission.around_init_req_max_new_tokens,
        enabled=admission.admission_enabled,
    ),
    # --- request validation (HTTP process) ----------------------------------------------------
    Hook(
        "sglang.srt.sampling.sampling_params.SamplingParams.verify",
        Kind.AFTER,
        "a bad custom_params.kv_policy is a 400, never a crashed scheduler",
        params=("self",),
        fn=request_validation.after_verify,
    ),
    # --- per-request KV statistics: scheduler -> meta_info -> OpenAI usage ---------------------
    Hook(
        f"{_SCHEDULER}.get_output_streamer_class",
        Kind.AROUND,
        "the output streamer gains the per-request KV statistics",
        params=("self",),
        fn=usage_report.around_get_output_streamer_class,
    ),
    Hook(
        f"{_STREAMER}.has_additional_customized_info",
        Kind.ATTRIBUTE,
        "the reporting streamer keeps the base streamer's own customized info",
        attr_type=bool,
    ),
    Hook(
        f"{_STREAMER}.should_build_additional_customized_info",
        Kind.OVERRIDE,
        "overridden by the reporting streamer",
        params=("self",),
        exact=True,
    ),
    Hook(
        f"{_STREAMER}.build_additional_customized_info",
        Kind.OVERRIDE,
        "overridden by the reporting streamer: {key: one value per request}",
        params=("self", "reqs"),
        exact=True,
    ),
    Hook(
        f"{_SCHED_BATCH}.FINISH_ABORT",
        Kind.ATTRIBUTE,
        "an aborted request reports no KV statistics",
        attr_type=type,
    ),
    Hook(
        f"{_TOKENIZER}.update_request_meta_info",
        Kind.AROUND,
        "the statistics become meta_info['raas_kv_cache']",
        params=("self", "meta_info", "state", "customized_info", "index"),
        fn=usage_report.around_update_request_meta_info,
    ),
    Hook(
        f"{_TOKENIZER}.generate_request",
        Kind.AROUND,
        "collects a stream's final statistics for its usage chunk",
        params=("self", "obj"),
        fn=usage_report.around_generate_request,
        async_gen=True,
    ),
    Hook(
        "sglang.srt.entrypoints.openai.protocol.UsageInfo",
        Kind.ATTRIBUTE,
        "subclassed with a kv_cache field",
        attr_type=type,
    ),
    *(
        Hook(
            f"{cls}.{method}",
            Kind.AFTER,
            "the response's usage gains kv_cache",
            params=("self", "request", "ret"),
            fn=usage_report.after_build_response,
        )
        for cls, method in (
            (_CHAT, "_build_chat_response"),
            (_COMPLETION, "_build_completion_response"),
        )
    ),
    *(
        Hook(
            f"{cls}.{method}",
            Kind.AROUND,
            "the final usage chunk of a stream gains kv_cache",
            params=("self", "adapted_request"),
            fn=usage_report.around_stream,
            async_gen=True,
        )
        for cls, method in (
            (_CHAT, "_generate_chat_stream"),
            (_COMPLETION, "_generate_completion_stream"),
        )
    ),
)


class HookTableError(RuntimeError):
    """The installed SGLang does not offer what the plugin hooks into."""


def installed_sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def active_hooks(hooks: Iterable[Hook] | None = None) -> list[Hook]:
    """The entries `register()` installs in this process."""
    return [h for h in (HOOKS if hooks is None else hooks) if h.enabled()]


def resolve(target: str) -> Any:
    """The object at `target`, unwrapped from classmethod/staticmethod as HookRegistry
    does. Raises LookupError naming what is missing."""
    obj_path, _, attr = target.rpartition(".")
    try:
        owner = pkgutil.resolve_name(obj_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LookupError(f"cannot import {obj_path} ({exc})") from exc
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
    if isinstance(raw, classmethod | staticmethod):
        return raw.__func__
    try:
        return getattr(owner, attr)
    except AttributeError:
        raise LookupError(f"{obj_path} has no attribute {attr!r}") from None


def _params(fn: Any) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _accepts(fn: Callable[..., Any], kind: inspect._ParameterKind) -> bool:
    return any(p.kind is kind for p in _params(fn) or [])


def _describe(params: Sequence[inspect.Parameter]) -> str:
    return "(" + ", ".join(str(p) for p in params) + ")"


def _signature_problems(hook: Hook, target: Any) -> list[str]:
    params = _params(target)
    if params is None:
        return [f"has no inspectable signature ({type(target).__name__})"]
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    problems = []
    if tuple(positional[: len(hook.params)]) != hook.params:
        problems.append(
            f"expected parameters starting ({', '.join(hook.params)}), found {_describe(params)}"
        )
    if hook.exact and len(positional) != len(hook.params):
        problems.append(f"expected exactly ({', '.join(hook.params)}), found {_describe(params)}")
    if hook.fn is not None and hook.kind in PATCHES:
        if not _accepts(hook.fn, inspect.Parameter.VAR_POSITIONAL) and len(positional) > len(
            hook.params
        ):
            problems.append(
                f"takes more positional parameters than {hook.fn.__qualname__} accepts: "
                f"{_describe(params)}"
            )
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if keyword_only and not _accepts(hook.fn, inspect.Parameter.VAR_KEYWORD):
            problems.append(
                f"has keyword-only parameters {keyword_only} that "
                f"{hook.fn.__qualname__} does not accept"
            )
    if hook.async_gen and not inspect.isasyncgenfunction(inspect.unwrap(target)):
        problems.append("is no longer an async generator function")
    return problems


def problems_of(hook: Hook) -> list[str]:
    """What is wrong with `hook` against the installed SGLang (empty: it matches)."""
    try:
        target = resolve(hook.target)
    except LookupError as exc:
        return [f"missing: {exc}"]
    if hook.kind is Kind.ATTRIBUTE:
        if hook.attr_type is type and not isinstance(target, type):
            return [f"expected a class, found {type(target).__name__}"]
        if hook.attr_type not in (None, type) and not isinstance(target, hook.attr_type):
            return [f"expected a {hook.attr_type.__name__}, found {type(target).__name__}"]
        return []
    if not callable(target) or isinstance(target, type):
        return [f"expected a function, found {type(target).__name__}"]
    return _signature_problems(hook, target)


def check_hooks(hooks: Iterable[Hook]) -> None:
    """Raise HookTableError listing every entry that does not match the installed SGLang."""
    failures = [
        f"  - {hook.target} ({hook.kind.value}; {hook.why}): {problem}"
        for hook in hooks
        for problem in problems_of(hook)
    ]
    if failures:
        raise HookTableError(
            f"raas plugin: {len(failures)} hook(s) into SGLang internals are missing or "
            f"changed in the installed SGLang {installed_sglang_version()} (the plugin "
            f"targets SGLang {TARGET_SGLANG_VERSION}):\n"
            + "\n".join(failures)
            + f"\nInstall sglang=={TARGET_SGLANG_VERSION}, or port the entries in "
            "raas_backend/sglang_plugin/hook_table.py (and their hook functions)."
        )
