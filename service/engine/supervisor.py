"""Keeping track of the engine: supervise our own SGLang child, or watch a remote one.

Embedded mode starts `sglang.launch_server` in its own process group, waits for it to
answer a generation, restarts it with exponential backoff whenever it dies or stops
answering, and on shutdown stops it the way SGLang stops cleanly (SIGTERM to the
launcher), then kills whatever is left of its group so nothing is orphaned. Remote mode
only probes. Either way `ready` is what readiness reports and what makes the chat route
answer 503 early.

Liveness must tell a busy engine from a dead one. The generation probe cannot: it queues
behind a long prefill (minutes on a CPU, a 100K-token prompt on a GPU). So each round
(`probe_round`) asks the HTTP front end first (`/model_info`, answered without the
scheduler), then the scheduler (a one-token generation); a scheduler that does not answer
while requests are in flight and have shown progress within `engine_stall_timeout_s`
counts as busy, not failed. Dead processes are seen without any probe: the launcher's exit,
and the death of any SGLang worker process (service/engine/processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import IO, Protocol

import structlog

from service.engine.client import FRONT_END_PROBE_PATH, EngineClient, Health
from service.engine.command import EngineOptions, build_engine_command
from service.engine.processes import Worker, dead, engine_workers
from service.server.settings import Settings

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class EngineMonitor(Protocol):
    state: EngineState
    restarts: int

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def probe_round(settings: Settings, client: EngineClient) -> Health:
    """One liveness verdict: OK, BUSY (working, not answering), SLOW or DOWN."""
    timeout = settings.engine_health_timeout_s
    front = await client.probe(timeout, FRONT_END_PROBE_PATH)
    if front is not Health.OK:
        return front
    health = await client.probe(timeout)
    activity = client.activity
    if (
        health is not Health.OK
        and activity.in_flight > 0
        and activity.silent_for() < settings.engine_stall_timeout_s
    ):
        return Health.BUSY
    return health


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it if the gateway dies hard.

    SGLang's launcher then tears down its own scheduler and detokenizer processes.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RemoteEngine:
    """An engine someone else runs: readiness follows its `/health`."""

    def __init__(self, settings: Settings, client: EngineClient) -> None:
        self._settings = settings
        self._client = client
        self.state = EngineState.STARTING
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    async def start(self) -> None:
        self._task = asyncio.create_task(self._probe_forever(), name="remote-engine-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = EngineState.STOPPED

    async def _probe_forever(self) -> None:
        s = self._settings
        slow = 0
        while True:
            health = await probe_round(s, self._client)
            slow = slow + 1 if health is Health.SLOW else 0
            if health in (Health.OK, Health.BUSY):
                new_state = EngineState.READY
            elif health is Health.DOWN or slow >= s.engine_unhealthy_threshold:
                new_state = EngineState.UNHEALTHY
            else:
                new_state = self.state  # one late answer from a busy engine changes nothing
            if new_state is not self.state:
                log.info("engine.state", mode="remote", state=new_state.value)
            self.state = new_state
            await asyncio.sleep(s.engine_health_interval_s)


class EmbeddedEngine:
    """SGLang as a supervised child process."""

    def __init__(self, settings: Settings, client: EngineClient) -> None:
        self._settings = settings
        self._client = client
        self.state = EngineState.STARTING
        self.restarts = 0
        self.model_path: Path | None = Path(settings.model_path) if settings.model_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._workers: list[Worker] = []
        # Told the model directory once it is known (the bundled one is resolved lazily).
        self.on_model_path: Callable[[Path], None] | None = None

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="embedded-engine-supervisor")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._kill_group(graceful=True)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self.state = EngineState.STOPPED

    def command(self, model_path: Path) -> list[str]:
        s = self._settings
        opts = EngineOptions(
            model_path=str(model_path),
            host=s.engine_host,
            port=s.engine_port,
            device=s.engine_device,
            attention_backend=s.engine_attention_backend,
            dtype=s.engine_dtype,
            max_total_tokens=s.engine_max_total_tokens,
            enable_metrics=True,
            sleep_on_idle=s.engine_sleep_on_idle,
            extra_args=("--served-model-name", s.model_name, *s.engine_extra_args),
        )
        return build_engine_command(opts)

    async def _supervise(self) -> None:
        backoff = self._settings.engine_restart_backoff_s
        while not self._stopping.is_set():
            self.state = EngineState.STARTING
            became_ready = False
            try:
                await self._spawn()
                became_ready = await self._wait_healthy()
                if became_ready:
                    self.state = EngineState.READY
                    self._workers = engine_workers(self._proc.pid) if self._proc else []
                    log.info(
                        "engine.ready",
                        pid=self.pid,
                        restarts=self.restarts,
                        workers=[f"{w.name}:{w.pid}" for w in self._workers],
                    )
                    await self._watch()
            except Exception:
                log.exception("engine.supervisor_error")
            if self._stopping.is_set():
                return
            self.state = EngineState.RESTARTING
            await self._kill_group()
            if became_ready:
                backoff = self._settings.engine_restart_backoff_s
            self.restarts += 1
            log.warning("engine.restart_scheduled", in_s=backoff, restarts=self.restarts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
            backoff = min(backoff * 2, self._settings.engine_restart_backoff_max_s)

    async def _spawn(self) -> None:
        if self.model_path is None:
            from service.engine.bundled_model import resolve_model_path

            # Conversion is slow and CPU-bound the first time; keep the event loop free.
            self.model_path = await asyncio.to_thread(resolve_model_path, None)
            if self.on_model_path is not None:
                self.on_model_path(self.model_path)
        cmd = self.command(self.model_path)
        out: IO[bytes] | None = None
        if self._settings.engine_log_file is not None:
            if self._log_fh is None:
                self._log_fh = self._settings.engine_log_file.open("ab")
            out = self._log_fh
        # Popen runs in the loop's thread on purpose: PDEATHSIG fires when the *thread*
        # that forked exits, and this thread lives as long as the gateway.
        self._proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            env=os.environ.copy(),
        )
        log.info("engine.spawned", pid=self._proc.pid, port=self._settings.engine_port)

    async def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self._settings.engine_start_timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                log.error("engine.exited_during_start", returncode=code)
                return False
            if await self._client.probe(self._settings.engine_health_timeout_s) is Health.OK:
                return True
            await asyncio.sleep(0.5)
        if not self._stopping.is_set():
            log.error("engine.start_timeout", seconds=self._settings.engine_start_timeout_s)
        return False

    def _dead_process(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            code = self._proc.returncode if self._proc else None
            log.error("engine.exited", returncode=code)
            return True
        if gone := dead(self._workers):
            log.error("engine.worker_died", workers=[f"{w.name}:{w.pid}" for w in gone])
            return True
        return False

    async def _watch(self) -> None:
        """Return when an engine process dies or the engine stops answering (and is not
        merely busy)."""
        s = self._settings
        probe: asyncio.Task[Health] | None = None
        failures = 0
        next_probe = time.monotonic() + s.engine_health_interval_s
        try:
            while not self._stopping.is_set():
                if self._dead_process():
                    self.state = EngineState.RESTARTING
                    return
                # The probe runs beside the process check: a slow probe must not delay
                # noticing a dead process, which is what turns into 503s.
                if probe is None and time.monotonic() >= next_probe:
                    probe = asyncio.create_task(probe_round(s, self._client))
                if probe is not None and probe.done():
                    health = probe.result()
                    probe = None
                    next_probe = time.monotonic() + s.engine_health_interval_s
                    if health is Health.BUSY:
                        log.info(
                            "engine.busy",
                            in_flight=self._client.activity.in_flight,
                            silent_s=round(self._client.activity.silent_for(), 1),
                        )
                    if health in (Health.OK, Health.BUSY):
                        failures = 0
                        self.state = EngineState.READY
                    else:
                        failures += 1
                        if health is Health.DOWN or failures >= s.engine_unhealthy_threshold:
                            self.state = EngineState.UNHEALTHY
                        if failures >= s.engine_unhealthy_threshold:
                            log.error("engine.unresponsive", failed_probes=failures)
                            return
                await asyncio.sleep(0.2)
        finally:
            if probe is not None:
                probe.cancel()

    async def _kill_group(self, *, graceful: bool = False) -> None:
        """End the engine. `graceful` (a normal stop): SIGTERM to the launcher alone, which
        SGLang handles by telling its scheduler to shut down and release its memory, then
        exiting; signalling the whole group instead kills the scheduler mid-step, which it
        reports to the launcher as a crash (SIGQUIT). A dead or hung engine is killed at
        once: its requests are failing meanwhile. Either way the group is killed last, so
        nothing it started outlives it."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        self._workers = []
        pgid = proc.pid  # start_new_session made the child its group's leader
        if graceful:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self._settings.engine_stop_grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        # The leader may be gone while its scheduler children linger: kill the group anyway.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if proc.poll() is None:
            await asyncio.to_thread(proc.wait, 10)
        log.info("engine.stopped", pid=proc.pid, returncode=proc.returncode, graceful=graceful)


def make_engine_monitor(settings: Settings, client: EngineClient) -> EngineMonitor:
    if settings.engine_mode == "embedded":
        return EmbeddedEngine(settings, client)
    return RemoteEngine(settings, client)
