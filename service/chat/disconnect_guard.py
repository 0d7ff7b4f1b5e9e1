"""Await upstream work only as long as the client is still there.

An upstream call (a chat completion, opening a stream) is raced against the client's
disconnect. The work is cancelled when the client leaves or the caller is cancelled
(server shutdown); a result that arrives anyway, in the same loop iteration as the
cancellation, has nobody to take it, so `on_orphan` disposes of it (an open stream must
be closed at once, not left to the garbage collector with its connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from fastapi import Request
from starlette.types import Receive

log = structlog.get_logger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class DisconnectWatch:
    """Cancels the current task when the client's connection goes, from a watcher task
    that reads `http.disconnect`. In the task's `CancelledError` handler, `take_back()`
    says whether the cancellation was the watch's alone and, if so, withdraws it (as
    `asyncio.timeout` does), so that the task can run its clean-up and carry on.

    The work being watched runs in the task itself rather than in a task of its own: no
    second task to start and wake between the engine's answer and its relay, each an
    event-loop iteration of code that runs cold when requests come one at a time.
    """

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("DisconnectWatch needs a running task")
        self._task = task
        self._watching = True
        self.client_left = False
        self._watcher = asyncio.ensure_future(wait_disconnect(receive))
        self._watcher.add_done_callback(self._ended)

    def _ended(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled():
            return
        watcher.exception()  # retrieved: it ends with the client's connection, either way
        # A callback scheduled just before `stop()` must not cancel what follows it.
        if self._watching:
            self.client_left = True
            self._task.cancel()

    def take_back(self) -> bool:
        return self.client_left and self._task.uncancel() == 0

    def stop(self) -> None:
        self._watching = False
        self._watcher.cancel()


async def until_disconnect(
    request: Request,
    work: Awaitable[T],
    *,
    on_orphan: Callable[[T], None] | None = None,
) -> T:
    """Await `work` in this task, but give up (and cancel it) as soon as the client goes
    away: raises ClientDisconnected then."""
    watch = DisconnectWatch(request.receive)
    try:
        result = await work
    except asyncio.CancelledError:
        _dispose_finished(work, on_orphan)
        if watch.take_back():
            raise ClientDisconnected from None
        raise  # cancelled by someone else (server shutdown), or by both
    finally:
        watch.stop()
    if watch.client_left:
        # The work swallowed its cancellation and finished anyway: nobody takes the result.
        watch.take_back()
        if on_orphan is not None:
            _dispose(result, on_orphan)
        raise ClientDisconnected
    return result


def _dispose_finished(work: Awaitable[T], on_orphan: Callable[[T], None] | None) -> None:
    """A future (or task) handed in as the work may hold a result that arrived in the
    loop iteration of the cancellation; a coroutine gets the cancellation itself."""
    if on_orphan is None or not isinstance(work, asyncio.Future) or not work.done():
        return  # one still pending was cancelled with the caller, as any awaited future
    if not work.cancelled() and work.exception() is None:
        _dispose(work.result(), on_orphan)


def _dispose(result: T, on_orphan: Callable[[T], None]) -> None:
    try:
        on_orphan(result)
    except Exception as exc:  # a cleanup failure must not surface in the event loop
        log.warning("upstream.orphan_cleanup_failed", error=str(exc) or type(exc).__name__)


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone. Call only after the request body was read: the
    server's receive() then blocks until the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # never spin if a server hands out empty body messages
