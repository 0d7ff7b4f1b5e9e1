"""For `make eval`: use the gateway at the base URL if one answers, else start
`raas-serve serve` (embedded engine, bundled model) there for the run and stop it after."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# First start converts the bundled model and SGLang loads it on the CPU: minutes.
READY_TIMEOUT_S = 900.0


def server_root(base_url: str) -> str:
    """`http://host:port/v1` -> `http://host:port` (health probes live at the root)."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def is_ready(root: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{root}/health/ready", timeout=5).status_code == 200
    return False


def is_listening(root: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(f"{root}/health/live", timeout=5)
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(root: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not is_ready(root):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("raas-serve exited before it was ready:\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            raise TimeoutError(f"raas-serve not ready after {READY_TIMEOUT_S:.0f}s (log: {log})")
        time.sleep(1.0)  # polling readiness: there is no event to wait on from outside


@contextlib.contextmanager
def gateway_for(base_url: str, log_path: Path) -> Iterator[bool]:
    """Yield True when this started the gateway. A gateway already listening is used as it
    is (waiting for it to be ready); a non-loopback URL is never started here."""
    root = server_root(base_url)
    if is_listening(root):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not is_ready(root):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{root} answers but is not ready")
            time.sleep(1.0)
        yield False
        return
    parts = urlsplit(base_url)
    if parts.hostname not in LOOPBACK:
        raise RuntimeError(f"nothing answers at {root}, and only a loopback gateway is started")
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    cmd += ["--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 80)]
    # A free engine port, not SGLang's default 30000: an engine already there (another
    # gateway's) would answer this gateway's probes and serve its requests.
    cmd += ["--engine-port", str(free_port())]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"raas-eval: starting the gateway ({' '.join(cmd[1:])}), log {log_path}", file=sys.stderr)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(root, proc, log_path)
            yield True
        finally:
            # SIGTERM: the gateway drains, then stops its engine's process group itself.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
