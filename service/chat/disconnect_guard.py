"""Await upstream work only as long as the client is still there.

An upstream call (a chat completion, opening a stream, a place in the admission queue)
runs in an anyio task group beside a watcher that reads `http.disconnect`, as Starlette's
own streaming response listens for one: when the client goes, the watcher cancels the
group's scope, which cancels the work; the cancellation stays inside that scope, so the
caller carries on to its clean-up. A result that arrives in the same loop iteration as
the disconnect has nobody to take it, so `on_orphan` disposes of it (an open stream must
be closed, not left to the garbage collector with its connection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog
from starlette.types import Receive

log = structlog.get_logger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def until_disconnect(
    receive: Receive,
    work: Awaitable[T],
    *,
    on_orphan: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """Await `work`, but give up (and cancel it) as soon as the client goes away: raises
    ClientDisconnected then. Call only after the request body was read."""
    client_left = False
    finished = False
    result: T | None = None
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal client_left
                # A receive() that fails ends with the client's connection too.
                with contextlib.suppress(Exception):
                    await wait_disconnect(receive)
                client_left = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            # The work's own error is raised as itself below, not as an exception group.
            try:
                result = await work
                finished = True
            except Exception as exc:
                failure = exc
            group.cancel_scope.cancel()
    except BaseException:
        # Cancelled from outside (a server shutdown) just after the work finished.
        if finished and on_orphan is not None:
            await _dispose(result, on_orphan)  # type: ignore[arg-type]
        raise
    if failure is not None:
        raise failure
    if client_left:
        if finished and on_orphan is not None:
            await _dispose(result, on_orphan)  # type: ignore[arg-type]
        raise ClientDisconnected
    return result  # type: ignore[return-value]


async def _dispose(result: T, on_orphan: Callable[[T], Awaitable[None]]) -> None:
    try:
        with anyio.CancelScope(shield=True):
            await on_orphan(result)
    except Exception as exc:  # a clean-up failure must not replace the disconnect
        log.warning("upstream.orphan_cleanup_failed", error=str(exc) or type(exc).__name__)


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone. Call only after the request body was read: the
    server's receive() then blocks until the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        # Never spin if a server hands out empty body messages.
        await anyio.sleep(0.05)
