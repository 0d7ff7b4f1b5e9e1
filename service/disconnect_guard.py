"""Await upstream work only as long as the client is still there.

An upstream call (a chat completion, opening a stream) is raced against the client's
disconnect. The work is cancelled when the client leaves or the caller is cancelled
(server shutdown); a result that arrives anyway, in the same loop iteration as the
cancellation, has nobody to take it, so `on_orphan` disposes of it (an open stream must
be closed at once, not left to the garbage collector with its connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from fastapi import Request
from starlette.types import Receive

log = structlog.get_logger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def until_disconnect(
    request: Request,
    work: Awaitable[T],
    *,
    on_orphan: Callable[[T], None] | None = None,
) -> T:
    """Await `work`, but give up (and cancel it) as soon as the client goes away.

    Raises ClientDisconnected when the client left first.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _abandon(task, on_orphan)
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    _abandon(task, on_orphan)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected


def _abandon(task: asyncio.Future[T], on_orphan: Callable[[T], None] | None) -> None:
    task.cancel()
    if on_orphan is not None:
        # Runs at once for a task that had already finished (cancel() was a no-op).
        task.add_done_callback(lambda done: _dispose(done, on_orphan))


def _dispose(done: asyncio.Future[T], on_orphan: Callable[[T], None]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    try:
        on_orphan(done.result())
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
