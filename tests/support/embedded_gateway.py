"""Run `raas-serve serve` in embedded mode (gateway plus its supervised SGLang) for a test.

The gateway is its own process, as in production: signals, exit codes, its memory and its
engine's process group can be observed from outside. Holds the machine-wide engine lock
for its lifetime, like `sglang_server`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.gateway_server import wait_ready
from tests.support.sglang_server import (
    START_TIMEOUT_S,
    descendants,
    free_port,
    heavy_process_lock,
    stop_process_group,
)
from tests.support.tiny_model import make_tiny_model


@dataclass
class Served:
    url: str
    engine_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    engine_log_path: Path

    def engine_pid(self) -> int:
        """The engine launcher: the gateway's child that leads its own process group."""
        for pid in descendants(self.process.pid):
            try:
                if os.getpgid(pid) == pid:
                    return pid
            except ProcessLookupError:
                continue
        raise LookupError("no engine process found")

    def logs(self) -> str:
        gateway = self.log_path.read_text(errors="replace").splitlines()[-40:]
        engine = self.engine_log_path.read_text(errors="replace").splitlines()[-40:]
        return "\n".join(["--- gateway ---", *gateway, "--- engine ---", *engine])


@contextlib.contextmanager
def embedded_gateway(
    model_path: Path, workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[Served]:
    """`raas-serve serve` on free ports; `env` adds RAAS_* settings (restarts are quick)."""
    port, engine_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "RAAS_ENGINE_LOG_FILE": str(workdir / "engine.log"),
        "RAAS_ENGINE_DTYPE": "float32",
        "RAAS_ENGINE_RESTART_BACKOFF_S": "0.5",
        "RAAS_ENGINE_HEALTH_INTERVAL_S": "1",
        "RAAS_MODEL_PATH": str(model_path),
        # A failed test may leave streams open: teardown must not wait the default drain.
        "RAAS_DRAIN_TIMEOUT_S": "5",
        **(env or {}),
    }
    log_path = workdir / "gateway.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    cmd += ["--engine-port", str(engine_port)]
    with heavy_process_lock(), log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        srv = Served(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{engine_port}",
            proc,
            log_path,
            workdir / "engine.log",
        )
        try:
            try:
                wait_ready(srv.url, timeout_s=START_TIMEOUT_S)
            except TimeoutError as exc:
                raise RuntimeError(f"{exc}\n{srv.logs()}") from exc
            yield srv
        finally:
            stop_process_group(proc, grace_s=40)


@contextlib.contextmanager
def tiny_embedded_gateway(
    bundled_model: Path, workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[Served]:
    """The same on the tiny random-weight model: starts fast, its KV accounting is real."""
    tiny = make_tiny_model(bundled_model, workdir / "tiny-model")
    dummy = {"RAAS_ENGINE_EXTRA_ARGS": '["--load-format", "dummy"]'}
    with embedded_gateway(tiny, workdir, {**dummy, **(env or {})}) as srv:
        yield srv
