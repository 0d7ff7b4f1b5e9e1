"""The SGLang command line for an engine we start ourselves (embedded mode, tests, benchmarks).

One place decides the flags, so `make serve`, the tests and the benchmarks run the same
engine configuration.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field


def cuda_available() -> bool:
    # nvidia-smi avoids importing torch in the gateway process just to pick a device.
    return shutil.which("nvidia-smi") is not None


@dataclass(frozen=True)
class EngineOptions:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    device: str = "auto"
    attention_backend: str = "raas"
    dtype: str = "auto"
    max_total_tokens: int | None = 16384
    max_running_requests: int | None = None
    context_length: int | None = None
    mem_fraction_static: float | None = None
    enable_metrics: bool = True
    # SGLang's scheduler polls for work in a busy loop: an idle engine keeps a core busy.
    # With the flag it waits on its sockets instead, woken by the next request
    # (docs/operations.md, "What runs in a pod"). None: on for the CPU, where that core is
    # the one inference needs; SGLang's default on a GPU host.
    sleep_on_idle: bool | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if cuda_available() else "cpu"


def build_engine_command(opts: EngineOptions) -> list[str]:
    device = opts.resolved_device()
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        opts.model_path,
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--device",
        device,
        "--attention-backend",
        opts.attention_backend,
        "--dtype",
        opts.dtype,
        # The radix cache would re-insert slots that RaaS already freed, and overlap
        # scheduling allocates the next step before eviction runs.
        "--disable-radix-cache",
        "--disable-overlap-schedule",
    ]
    if device == "cpu":
        cmd += [
            "--sampling-backend",
            "pytorch",
            "--disable-cuda-graph",
            "--mem-fraction-static",
            str(opts.mem_fraction_static or 0.1),
        ]
    elif opts.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(opts.mem_fraction_static)]
    if opts.max_total_tokens is not None:
        cmd += ["--max-total-tokens", str(opts.max_total_tokens)]
    if opts.max_running_requests is not None:
        cmd += ["--max-running-requests", str(opts.max_running_requests)]
    if opts.context_length is not None:
        cmd += ["--context-length", str(opts.context_length)]
    if opts.enable_metrics:
        cmd.append("--enable-metrics")
    if opts.sleep_on_idle or (opts.sleep_on_idle is None and device == "cpu"):
        cmd.append("--sleep-on-idle")
    cmd += list(opts.extra_args)
    return cmd
