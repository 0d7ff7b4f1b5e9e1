"""Graceful drain on SIGTERM: stop admitting, let in-flight requests finish, then exit.

Kubernetes sends SIGTERM and, at the same time, starts taking the pod out of the
Service's endpoints; requests routed before that lands still arrive for a moment. Plain
uvicorn closes its socket at once (those requests get connection refused) and gives open
streams only `timeout_graceful_shutdown`. Here the first signal only flips `Drain`: new
chat requests get a 503 the client can retry elsewhere, readiness reports 503, and the
server keeps running until nothing is in flight or `drain_timeout_s` has passed. Streams
still open then are cut by the gateway itself: each ends with an error event (code
`shutting_down`) and `data: [DONE]`, as a cut stream must, instead of a connection that
uvicorn's shutdown cancels mid-chunk. Then uvicorn's own shutdown runs (the lifespan stops
the engine). A second signal cuts the drain short.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Protocol

import structlog
import uvicorn
from fastapi import FastAPI

log = structlog.get_logger(__name__)

# After the cut, how long the cut streams get to send their last event and clean up.
CUT_GRACE_S = 5.0


class Cuttable(Protocol):
    def cut(self) -> None: ...


class Drain:
    """Whether the gateway is draining, and the open streams a drain may have to cut;
    shared by the server and the request path."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.cut_at: float | None = None
        self._streams: set[Cuttable] = set()

    def track(self, stream: Cuttable) -> None:
        self._streams.add(stream)

    def untrack(self, stream: Cuttable) -> None:
        self._streams.discard(stream)

    def cut_streams(self) -> int:
        """End every open stream now; returns how many there were."""
        self.cut_at = time.monotonic()
        streams = list(self._streams)
        for stream in streams:
            stream.cut()
        return len(streams)

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()


class DrainingServer(uvicorn.Server):
    """A uvicorn server for the gateway app whose first SIGTERM/SIGINT drains first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout_s: float) -> None:
        super().__init__(config)
        self.drain: Drain = app.state.drain
        self._state = app.state
        self._timeout_s = timeout_s

    def _busy(self) -> int:
        # Admitted or queued requests; a stream keeps its admission until its last byte is
        # sent, so zero means every response has been delivered. The admission controller
        # appears when the lifespan starts.
        admission = getattr(self._state, "admission", None)
        return 0 if admission is None else admission.in_flight + admission.queued

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.active or self._timeout_s <= 0:
            # uvicorn's path: records the signal and re-raises it after shutdown.
            super().handle_exit(sig, frame)
            return
        # Not recorded: after a completed drain the process exits 0, as a clean stop.
        self.drain.begin()
        log.info(
            "gateway.draining",
            signal=signal.Signals(sig).name,
            in_flight=self._busy(),
            timeout_s=self._timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        started = self.drain.started_at
        if started is not None and not self.should_exit:
            busy = self._busy()
            now = time.monotonic()
            waited = now - started
            if busy and waited >= self._timeout_s and self.drain.cut_at is None:
                log.warning("gateway.drain_cut", streams=self.drain.cut_streams(), in_flight=busy)
            cut_at = self.drain.cut_at
            if busy == 0 or (cut_at is not None and now - cut_at >= CUT_GRACE_S):
                log.info("gateway.drained", left_in_flight=busy, seconds=round(waited, 3))
                self.should_exit = True
        return await super().on_tick(counter)
