"""Let stock SGLang run with ``--device cpu`` on a machine without sgl-kernel.

SGLang's rotary embedding decides at import time whether it runs on the CPU
(``_is_cpu``); on a machine without Intel's CPU build of sgl_kernel that check is False
and the forward pass falls back to ``vllm._custom_ops``, which is not installed. Telling
that module it runs on the CPU selects its plain torch implementation. Nothing else in
the CPU path needs patching (SGLang 0.5.23).
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

#: The module flag set here; declared with the plugin's other hooks in hook_table.py.
ROTARY_CPU_FLAG = "sglang.srt.layers.rotary_embedding.base._is_cpu"


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def enable_cpu_execution() -> bool:
    """Select SGLang's torch fallbacks when no CUDA device exists. Returns True if applied."""
    if cuda_present():
        return False
    module_name, _, flag = ROTARY_CPU_FLAG.rpartition(".")
    setattr(importlib.import_module(module_name), flag, True)
    logger.info("raas plugin: no CUDA device, SGLang rotary embedding set to its CPU path")
    return True
