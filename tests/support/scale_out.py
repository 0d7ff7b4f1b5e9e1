"""N real SGLang engines behind SGLang's router (`smg`), for the scale-out tests.

The engines are separate processes on this machine, each in its own process group so a
test can kill one outright (SIGKILL to the group: what a crashed node looks like to the
router) and start it again on the same port. All of them start under one heavy-process
lock, together: on 2 cores two tiny engines load in about the time of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.engine.command import EngineOptions, build_engine_command
from tests.support.sglang_server import (
    START_TIMEOUT_S,
    free_port,
    heavy_process_lock,
    stop_process_group,
    wait_healthy,
)
from tests.support.tiny_model import make_tiny_model

# How the router watches its workers here: a probe a second, one failure marks a worker
# unhealthy and one success brings it back (smg's defaults, 60 s and 3/2, suit a fleet,
# not a test that kills an engine and waits for it to rejoin).
ROUTER_HEALTH_ARGS = (
    "--health-check-interval-secs",
    "1",
    "--health-failure-threshold",
    "1",
    "--health-success-threshold",
    "1",
    "--load-monitor-interval",
    "1",
)


@dataclass
class EngineReplica:
    """One SGLang engine on a fixed port; `start()` again after `kill()` to bring it back."""

    model_dir: Path
    model_name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(
        default_factory=lambda: Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        opts = EngineOptions(
            model_path=str(self.model_dir),
            port=self.port,
            dtype="float32",
            attention_backend="raas",
            max_total_tokens=4096,
            extra_args=("--load-format", "dummy", "--served-model-name", self.model_name),
        )
        return build_engine_command(opts)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self) -> None:
        assert self.process is not None
        try:
            wait_healthy(self.url, self.process, START_TIMEOUT_S)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- SGLang log ---\n{self.log_tail()}") from exc

    def kill(self) -> None:
        """SIGKILL the whole engine (launcher, scheduler, detokenizer) at once."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def chat_posts(self) -> int:
        """Chat requests this engine answered, from its access log (the router's and the
        gateway's health probes are GETs)."""
        return self.log_path.read_text(errors="replace").count("POST /v1/chat/completions")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def engine_replicas(bundled: Path, workdir: Path, n: int, model_name: str) -> Iterator[list]:
    """`n` tiny random-weight engines (the tests' tiny model, raas backend), started
    together under the heavy-process lock, stopped on exit."""
    model = make_tiny_model(bundled, workdir)
    replicas = [EngineReplica(model, model_name) for _ in range(n)]
    with heavy_process_lock():
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                replica.wait_healthy()
            yield replicas
        finally:
            for replica in replicas:
                replica.stop()


def smg_command() -> str:
    """The router's command, installed beside this interpreter by the `router` extra."""
    beside = Path(sys.executable).with_name("smg")
    found = str(beside) if beside.exists() else shutil.which("smg")
    assert found, "smg not installed: make install puts it in the venv (the router extra)"
    return found


@dataclass
class RunningRouter:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def workers(self) -> dict[str, bool]:
        """Worker URL -> healthy, as the router sees them."""
        listed = httpx.get(f"{self.url}/workers", timeout=5).json()["workers"]
        return {w["url"]: bool(w["is_healthy"]) for w in listed}

    def wait_workers(self, expected: dict[str, bool], timeout_s: float = 60.0) -> float:
        """Block until the router reports exactly these health states; the seconds taken."""
        started = time.monotonic()
        seen: dict[str, bool] = {}
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                seen = self.workers()
                if seen == expected:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"router workers {seen}, expected {expected}")


@contextlib.contextmanager
def smg_router(worker_urls: list[str], policy: str = "least_load") -> Iterator[RunningRouter]:
    """SGLang's router on loopback in front of `worker_urls`, until the block ends."""
    port, metrics_port = free_port(), free_port()
    cmd = [
        smg_command(),
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        *ROUTER_HEALTH_ARGS,
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--log-level",
        "warn",
    ]
    fd, log_name = tempfile.mkstemp(prefix="smg-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    router = RunningRouter(f"http://127.0.0.1:{port}", proc, Path(log_name))
    try:
        router.wait_workers(dict.fromkeys(worker_urls, True))
        yield router
    finally:
        stop_process_group(proc, grace_s=10)
