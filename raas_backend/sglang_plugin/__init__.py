"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``raas``)."""

from __future__ import annotations


def register() -> None:
    """Called by SGLang's plugin loader in every SGLang process."""
    from raas_backend.sglang_plugin.cpu_support import enable_cpu_execution

    enable_cpu_execution()
