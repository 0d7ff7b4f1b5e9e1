"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``raas``).

SGLang calls `register()` in the launcher, the engine and every scheduler process. It
first checks every hook into SGLang internals declared in hook_table.py against the
installed SGLang (one error listing every mismatch, naming both versions), then lets
SGLang run on the CPU without sgl-kernel, registers `--attention-backend raas` (the
backend class is imported lazily, inside the factory) and installs the table's hooks:
start-up checks of the server settings (server_requirements.py), the scheduler hooks that
evict and free slots, admission sized by each request's bounded KV (admission.py),
validation of `custom_params.kv_policy` where SGLang validates sampling parameters, and
the report of each finished request's KV statistics (usage_report.py).

SGLang logs, and does not re-raise, an exception from a plugin, so a failed check alone
would surface as argparse's "invalid choice: 'raas'" below a page of usage. Instead the
backend stays unregistered, `raas` stays a valid choice, and the launcher's argument check
raises the same error for any launch that asks for `raas` (servers without it start).
"""

from __future__ import annotations

from typing import Any

BACKEND_NAME = "raas"


def backend_class(device: str) -> type:
    """The backend class SGLang builds on `device`."""
    # CUDA: SGLang's FlashInfer backend with sparse decode; elsewhere the torch path.
    if device.startswith("cuda"):
        from raas_backend.sglang_plugin.flashinfer_backend import RaasFlashInferBackend

        return RaasFlashInferBackend
    from raas_backend.sglang_plugin.backend import RaasAttnBackend

    return RaasAttnBackend


def _create_backend(model_runner: Any) -> Any:
    from raas_backend.sglang_plugin.server_requirements import check_loaded_model

    # The launcher refused what it could tell from the settings; a model's own sliding
    # window is only known here, once its weights are loaded.
    check_loaded_model(model_runner)
    return backend_class(str(model_runner.device))(model_runner)


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from raas_backend.sglang_plugin.cpu_support import enable_cpu_execution
    from raas_backend.sglang_plugin.hook_table import (
        PATCHES,
        HookTableError,
        active_hooks,
        check_hooks,
    )

    hooks = active_hooks()
    try:
        # Before any side effect: a mismatch installs none of the hooks, not half of them.
        check_hooks(hooks)
    except HookTableError as error:
        _refuse_raas_launches(error)
        raise
    enable_cpu_execution()
    register_attention_backend(BACKEND_NAME)(_create_backend)
    add_attention_backend_choices([BACKEND_NAME])
    for hook in hooks:
        if hook.kind in PATCHES:
            HookRegistry.register(hook.target, hook.fn, HookType(hook.kind.value))


def _refuse_raas_launches(error: Exception) -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from raas_backend.sglang_plugin.hook_table import (
        CHECK_SERVER_ARGS,
        CHOICES,
        HOOKS,
        problems_of,
    )
    from raas_backend.sglang_plugin.server_requirements import serves_raas

    needed = [h for h in HOOKS if h.target in (CHECK_SERVER_ARGS, CHOICES)]
    if any(problems_of(h) for h in needed):
        return  # the way to fail cleanly is itself gone: the logged error must do

    def refuse(result: None, server_args: object) -> None:
        if serves_raas(server_args):
            raise error
        return None

    add_attention_backend_choices([BACKEND_NAME])
    HookRegistry.register(CHECK_SERVER_ARGS, refuse, HookType.AFTER)
