"""The SGLang settings and models the `raas` backend cannot serve, refused at start.

`raas-serve` passes the right flags, but SGLang loads the backend for anyone who runs
`sglang.launch_server --attention-backend raas`. With the wrong settings the engine would
not fail: it would corrupt or leak KV slots, or crash its scheduler at the first decode.

Where the checks run:
- in the launcher, after SGLang has resolved and validated its arguments
  (`ServerArgs.check_server_args`, hooked through hook_table.py) and before it spawns
  any scheduler: the launch stops with one message listing every flag to change;
- in the scheduler, when the backend is built (`_create_backend` and the backend's
  constructor): what only the loaded model tells (its sliding window), and a second look
  at the settings for callers that reach the model runner another way.

Settings are read from SGLang's resolved view: a raw ServerArgs field holds the
operator's input (`page_size` None means "SGLang decides"), not what the engine runs
with. Nothing here imports SGLang at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

BACKEND = "raas"


@dataclass(frozen=True)
class Requirement:
    attr: str  # the resolved ServerArgs field
    required: object
    flag: str  # what to pass (or not pass) instead
    why: str


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "page_size",
        1,
        "--page-size 1",
        "the backend addresses KV by token slot; RaaS pages are its own (RAAS_PAGE_SIZE)",
    ),
    Requirement(
        "disable_radix_cache",
        True,
        "--disable-radix-cache",
        "the prefix cache would share rows whose evicted positions point at the padding slot",
    ),
    Requirement(
        "disable_overlap_schedule",
        True,
        "--disable-overlap-schedule",
        "overlap scheduling allocates the next step's slot before eviction runs",
    ),
    Requirement(
        "enable_mixed_chunk",
        False,
        "no --enable-mixed-chunk",
        "decode requests inside a mixed prefill batch skip the eviction hook",
    ),
    Requirement(
        "tp_size",
        1,
        "--tp-size 1",
        "each tensor-parallel rank would score its own heads and evict different pages",
    ),
    Requirement("pp_size", 1, "--pp-size 1", "pipeline stages would evict independently"),
    Requirement(
        "speculative_algorithm",
        None,
        "no --speculative-algorithm",
        "draft tokens are verified outside the decode step that evicts",
    ),
)

#: Every ServerArgs field the checks read (hook_table.py checks that SGLang has them).
FIELDS_READ: tuple[str, ...] = (
    *(r.attr for r in REQUIREMENTS),
    "attention_backend",
    "prefill_attention_backend",
    "decode_attention_backend",
    "device",
    "cuda_graph_config",
    "model_path",
)

_OTHER_BACKEND = "another --attention-backend (flashinfer on a GPU, torch_native on the CPU)"


@dataclass(frozen=True)
class ModelFacts:
    """What the model's attention looks like; `sliding_window` is known once loaded."""

    architectures: tuple[str, ...] = ()
    mla: bool = False
    encoder_decoder: bool = False
    hybrid_swa: bool = False
    chunked_attention: bool = False
    sliding_window: int | None = None


def model_facts(model_config: Any, sliding_window: int | None = None) -> ModelFacts:
    """Facts from SGLang's ModelConfig (read by attribute)."""
    arch = getattr(model_config, "attention_arch", None)
    hf_config = getattr(model_config, "hf_config", None)
    return ModelFacts(
        architectures=tuple(getattr(hf_config, "architectures", None) or ()),
        mla=getattr(arch, "name", None) == "MLA",
        encoder_decoder=bool(getattr(model_config, "is_encoder_decoder", False)),
        hybrid_swa=bool(getattr(model_config, "is_hybrid_swa", False)),
        chunked_attention=getattr(model_config, "attention_chunk_size", None) is not None,
        sliding_window=sliding_window,
    )


class UnsupportedServerArgs(ValueError):
    """The engine's settings (or model) are unsafe for the raas backend."""


def resolved_settings(server_args: Any) -> Any:
    """What the engine runs with: SGLang's resolved view once it has resolved the
    record; the object itself otherwise (a plain object in tests)."""
    if getattr(server_args, "_resolved_overrides", None) is None:
        return server_args
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args)


def attention_backends(settings: Any) -> tuple[str | None, str | None]:
    """(prefill, decode): the split flags fall back to --attention-backend, as in SGLang."""
    base = getattr(settings, "attention_backend", None)
    prefill = getattr(settings, "prefill_attention_backend", None) or base
    decode = getattr(settings, "decode_attention_backend", None) or base
    return prefill, decode


def _flag_problems(settings: Any) -> list[str]:
    return [
        f"{r.flag} ({r.why}; got {r.attr}={getattr(settings, r.attr)!r})"
        for r in REQUIREMENTS
        if getattr(settings, r.attr) != r.required
    ]


def _backend_problems(settings: Any) -> list[str]:
    prefill, decode = attention_backends(settings)
    if prefill == BACKEND and decode != BACKEND:
        return [
            "--decode-attention-backend raas, or no --decode-attention-backend (raas evicts "
            f"pages during decode, which the {decode} decode backend would still read; "
            f"got prefill={prefill!r}, decode={decode!r})"
        ]
    return []


def _cuda_graph_problems(settings: Any, decode_cuda_graphs: bool | None) -> list[str]:
    if decode_cuda_graphs is not False or getattr(settings, "device", None) != "cuda":
        return []
    graphs = getattr(settings, "cuda_graph_config", None)
    backend = getattr(getattr(graphs, "decode", None), "backend", None)
    if backend in (None, "disabled"):
        return []
    return [
        "--cuda-graph-backend-decode disabled (this raas backend has no CUDA-graph "
        f"support yet; got a {backend!r} decode graph)"
    ]


def _model_problems(model: ModelFacts | None) -> list[str]:
    if model is None:
        return []
    name = "/".join(model.architectures) or "this model"
    reasons = [
        (model.mla, "multi-head latent attention (MLA)"),
        (model.encoder_decoder, "encoder-decoder (cross) attention"),
        (model.hybrid_swa, "sliding-window layers (hybrid SWA KV pool)"),
        (model.chunked_attention, "chunked local attention"),
        (
            model.sliding_window not in (None, 0, -1),
            f"sliding-window attention (window {model.sliding_window})",
        ),
    ]
    return [
        f"{_OTHER_BACKEND} for {name}: it uses {what}, and raas decodes full causal "
        "multi-head / grouped-query attention only"
        for found, what in reasons
        if found
    ]


def check_server_args(
    server_args: Any,
    *,
    model: ModelFacts | None = None,
    decode_cuda_graphs: bool | None = None,
) -> None:
    """Raise UnsupportedServerArgs naming every setting to change (none: returns).

    `decode_cuda_graphs`: whether the backend implements SGLang's decode CUDA-graph
    protocol (None: not checked).
    """
    settings = resolved_settings(server_args)
    problems = [
        *_flag_problems(settings),
        *_backend_problems(settings),
        *_cuda_graph_problems(settings, decode_cuda_graphs),
        *_model_problems(model),
    ]
    if problems:
        raise UnsupportedServerArgs(
            "--attention-backend raas needs: " + "; ".join(problems) + ". `raas-serve` sets "
            "the flags itself."
        )


def serves_raas(server_args: Any) -> bool:
    return BACKEND in attention_backends(resolved_settings(server_args))


def _backend_decodes_in_cuda_graphs() -> bool:
    # Asked of the class, so the check follows the backend as it gains graph support.
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    from raas_backend.sglang_plugin import backend_class

    cls = backend_class("cuda")
    return cls.init_cuda_graph_state is not AttentionBackend.init_cuda_graph_state


def after_check_server_args(result: None, server_args: Any) -> None:
    """After SGLang's own `ServerArgs.check_server_args`, in the launcher: refuse what
    the raas backend cannot serve before any scheduler process exists."""
    settings = resolved_settings(server_args)
    if BACKEND not in attention_backends(settings):
        return None
    model = None
    if str(settings.model_path).lower() not in ("none", "dummy"):
        from sglang.srt.arg_groups.overrides import model_config_of

        model = model_facts(model_config_of(server_args))
    graphs = _backend_decodes_in_cuda_graphs() if settings.device == "cuda" else None
    check_server_args(server_args, model=model, decode_cuda_graphs=graphs)
    return None


def check_loaded_model(model_runner: Any) -> None:
    """In the scheduler, before the backend is built: what only the loaded model tells."""
    facts = model_facts(
        model_runner.model_config, getattr(model_runner, "sliding_window_size", None)
    )
    problems = _model_problems(facts)
    if problems:
        raise UnsupportedServerArgs("--attention-backend raas needs: " + "; ".join(problems))
