"""The SGLang command line we start engines with (embedded mode, tests, benchmarks)."""

from __future__ import annotations

from service.engine.command import EngineOptions, build_engine_command


def test_every_engine_gets_the_flags_the_raas_backend_requires():
    for device in ("cpu", "cuda"):
        cmd = build_engine_command(EngineOptions(model_path="m", device=device))
        assert {"--disable-radix-cache", "--disable-overlap-schedule"} <= set(cmd)
        assert cmd[cmd.index("--attention-backend") + 1] == "raas"


def test_cpu_engines_sleep_when_idle_and_gpu_engines_keep_sglangs_default():
    cpu = build_engine_command(EngineOptions(model_path="m", device="cpu"))
    gpu = build_engine_command(EngineOptions(model_path="m", device="cuda"))
    assert "--sleep-on-idle" in cpu and "--sleep-on-idle" not in gpu
    spinning = build_engine_command(
        EngineOptions(model_path="m", device="cpu", sleep_on_idle=False)
    )
    assert "--sleep-on-idle" not in spinning
