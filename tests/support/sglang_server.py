"""Start a real SGLang server in its own process group for a test, and tear it down fully.

SGLang kills its whole process tree when its scheduler fails, so it never runs inside the
pytest process. Only one heavy process runs at a time on this 2-core machine: every
engine start takes an exclusive file lock, which also serializes parallel test runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.engine.command import EngineOptions, build_engine_command

LOCK_PATH = Path(tempfile.gettempdir()) / "raas-heavy-process.lock"
START_TIMEOUT_S = float(os.environ.get("RAAS_TEST_ENGINE_START_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def heavy_process_lock() -> Iterator[None]:
    if os.environ.get("RAAS_HEAVY_LOCK", "1") == "0":
        # For a run under `nice` that measures engine CPU time, not wall time: it only
        # takes idle cycles, so it need not wait for (or hold up) other engines.
        yield
        return
    LOCK_PATH.touch(exist_ok=True)
    with LOCK_PATH.open("r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def descendants(pid: int) -> set[int]:
    """All live descendants of pid, read from /proc (psutil-free)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


# What SGLang (with its page-invariant and leak checks on) or a crashed scheduler writes
# when KV slots were mishandled.
KV_ERROR_MARKERS = ("use-after-free", "double free", "Mem Leak", "memory leak", "Traceback")


def assert_engine_log_clean(log_path: Path) -> None:
    """No slot mishandling or crash reported in an engine's log."""
    log = log_path.read_text(errors="replace")
    for bad in KV_ERROR_MARKERS:
        assert bad not in log, re.findall(rf".*{bad}.*", log)[:3]


def tree_jiffies(pids: set[int]) -> int:
    """CPU time (user + system, in clock ticks) used so far by these processes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def process_cpu_clock(pid: int) -> int:
    """Linux's CPU-time clock id of another process (the kernel's MAKE_PROCESS_CPUCLOCK)."""
    return ((~pid) << 3) | 2  # CPUCLOCK_SCHED: nanosecond run time, not tick-sampled


def tree_cpu_s(pids: set[int]) -> float:
    """CPU seconds used so far by these processes, exited threads included.

    /proc's utime + stime move in 10 ms ticks, too coarse for a few requests that cost about
    a millisecond each; the process CPU clock counts nanoseconds. A process that no longer
    exists (or a kernel without these clocks) falls back to its ticks, or counts nothing.
    """
    hz = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime_ns(process_cpu_clock(pid)) / 1e9
        except OSError:
            total += tree_jiffies({pid}) / hz
    return total


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SGLang exited with {proc.returncode} during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health_generate", timeout=30).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"SGLang not healthy after {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def sglang_server(
    model_path: str,
    *,
    env: dict[str, str] | None = None,
    **options: object,
) -> Iterator[RunningServer]:
    """Run `sglang.launch_server` for the duration of the block (holding the heavy lock)."""
    port = free_port()
    opts = EngineOptions(model_path=model_path, port=port, **options)  # type: ignore[arg-type]
    cmd = build_engine_command(opts)
    fd, log_name = tempfile.mkstemp(prefix="sglang-", suffix=".log")
    with heavy_process_lock(), os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        server = RunningServer(f"http://127.0.0.1:{port}", proc, Path(log_name))
        try:
            try:
                wait_healthy(server.url, proc, START_TIMEOUT_S)
            except Exception as exc:
                raise RuntimeError(f"{exc}\n--- SGLang log ---\n{server.log_tail()}") from exc
            yield server
        finally:
            stop_process_group(proc)
