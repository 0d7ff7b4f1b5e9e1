"""The SGLang command line we start engines with (embedded mode, tests, benchmarks)."""

from __future__ import annotations

from service.engine_command import EngineOptions, build_engine_command


def test_every_engine_gets_the_flags_the_raas_backend_requires():
    for device in ("cpu", "cuda"):
        cmd = build_engine_command(EngineOptions(model_path="m", device=device))
        assert {"--disable-radix-cache", "--disable-overlap-schedule"} <= set(cmd)
        assert cmd[cmd.index("--attention-backend") + 1] == "raas"
