"""Admission control: at most N requests in the engine, a bounded FIFO queue behind them,
and a per-API-key concurrency limit.

A freed slot is handed straight to the oldest waiter (no thundering herd, strict FIFO).
Rejections are immediate so that clients back off on a 429 instead of piling up sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import StrEnum


class RejectReason(StrEnum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    KEY_CONCURRENCY = "key_concurrency"


class AdmissionRejected(Exception):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Ticket:
    """A held slot. `release()` is idempotent so every exit path may call it."""

    controller: AdmissionController
    key_id: str | None
    queued_s: float
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.controller._release(self.key_id)


class AdmissionController:
    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float) -> None:
        if max_in_flight < 1:
            raise ValueError(f"expected max_in_flight >= 1, got {max_in_flight}")
        if max_queue < 0:
            raise ValueError(f"expected max_queue >= 0, got {max_queue}")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Per key: admitted plus queued, so a key cannot fill the queue past its limit either.
        self._per_key: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self, key_id: str | None = None, key_limit: int | None = None) -> Ticket | None:
        """A slot now, or None when the caller would have to queue (then `acquire`).

        Lets the common, uncontended case skip the machinery that waiting needs."""
        if key_id is not None and key_limit is not None and self._per_key[key_id] >= key_limit:
            raise AdmissionRejected(
                RejectReason.KEY_CONCURRENCY,
                f"This API key already has {key_limit} concurrent request(s), its limit",
            )
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            self._count_key(key_id, +1)
            return Ticket(self, key_id, 0.0)
        return None

    async def acquire(self, key_id: str | None = None, key_limit: int | None = None) -> Ticket:
        start = time.monotonic()
        ticket = self.try_acquire(key_id, key_limit)
        if ticket is not None:
            return ticket
        if len(self._waiters) >= self.max_queue:
            raise AdmissionRejected(
                RejectReason.QUEUE_FULL,
                f"Server is at capacity ({self.max_in_flight} in flight, "
                f"{self.max_queue} queued); retry later",
            )

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._count_key(key_id, +1)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.queue_timeout_s)
        except BaseException:
            self._abandon(waiter, key_id)
            raise
        if not done:
            self._abandon(waiter, key_id)
            raise AdmissionRejected(
                RejectReason.QUEUE_TIMEOUT,
                f"Request waited {self.queue_timeout_s:g} s in the admission queue; retry later",
            )
        return Ticket(self, key_id, time.monotonic() - start)

    def _abandon(self, waiter: asyncio.Future[None], key_id: str | None) -> None:
        if waiter.done() and not waiter.cancelled():
            # The slot was handed over just as we gave up: pass it on.
            self._release(key_id)
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        self._count_key(key_id, -1)

    def _release(self, key_id: str | None) -> None:
        self._count_key(key_id, -1)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_flight unchanged
                return
        self.in_flight -= 1

    def _count_key(self, key_id: str | None, delta: int) -> None:
        if key_id is None:
            return
        self._per_key[key_id] += delta
        if self._per_key[key_id] <= 0:
            del self._per_key[key_id]
