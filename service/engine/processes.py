"""The embedded engine's worker processes, read from /proc: which exist, which died.

SGLang's launcher does not notice a scheduler or detokenizer that dies without running
its own exception handler (SIGKILL, the OOM killer): the HTTP front end keeps accepting
requests that nothing will ever answer, and its generation probe only fails after its own
20 s timeout. Watching the workers directly tells the supervisor within a tick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# SGLang names its workers with setproctitle: "sglang::scheduler", "sglang::detokenizer".
WORKER_PREFIX = b"sglang::"


@dataclass(frozen=True)
class Worker:
    pid: int
    name: str
    # Start time in clock ticks since boot: tells the worker from a later process that
    # reuses its pid.
    started: int


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def engine_workers(root: int) -> list[Worker]:
    """SGLang's worker processes below `root` (the launcher); empty off Linux."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append(int(entry))
    found: list[Worker] = []
    stack = [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            cmd = _cmdline(pid)
            stat = _stat(pid)
            if cmd.startswith(WORKER_PREFIX) and stat is not None:
                name = cmd.split(b"\0", 1)[0].decode(errors="replace").strip()
                found.append(Worker(pid, name, stat[2]))
    return found


def dead(workers: list[Worker]) -> list[Worker]:
    """The workers that exited (a zombie counts: its parent has not reaped it yet)."""
    gone = []
    for worker in workers:
        stat = _stat(worker.pid)
        if stat is None or stat[0] in ("Z", "X") or stat[2] != worker.started:
            gone.append(worker)
    return gone
