"""`until_disconnect`: upstream work raced against the client leaving, and what happens to
a result nobody can take (an open upstream stream must be closed, not garbage-collected).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from service.chat.admission import AdmissionController, Ticket
from service.chat.disconnect_guard import ClientDisconnected, until_disconnect


class FakeRequest:
    """What the guard uses of a Starlette request: receive() blocks until a disconnect."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def cancel_as_work_finishes(on_orphan: Callable[[str], None]) -> None:
    """Cancel the guarded call in the loop iteration where its work returns a result."""
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    guarded = asyncio.ensure_future(
        until_disconnect(FakeRequest(), work, on_orphan=on_orphan)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.01)
    work.set_result("open stream")
    guarded.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guarded
    await asyncio.sleep(0)  # the done-callback runs


def test_returns_the_work_result() -> None:
    async def main() -> str:
        return await until_disconnect(FakeRequest(), asyncio.sleep(0.01, "done"))  # type: ignore[arg-type]

    assert run(main()) == "done"


def test_work_errors_propagate() -> None:
    async def boom() -> None:
        raise ValueError("engine said no")

    async def main() -> None:
        await until_disconnect(FakeRequest(), boom())  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="engine said no"):
        run(main())


def test_client_leaving_cancels_the_work() -> None:
    async def main() -> tuple[bool, list[str]]:
        request = FakeRequest()
        orphans: list[str] = []
        work = asyncio.ensure_future(asyncio.sleep(30, "late"))
        asyncio.get_running_loop().call_later(0.02, request.gone.set)
        with pytest.raises(ClientDisconnected):
            await until_disconnect(request, work, on_orphan=orphans.append)  # type: ignore[arg-type]
        return work.cancelled(), orphans

    cancelled, orphans = run(main())
    assert cancelled
    assert orphans == []


def test_caller_cancelled_while_waiting_cancels_the_work() -> None:
    async def main() -> tuple[bool, list[str]]:
        orphans: list[str] = []
        work = asyncio.ensure_future(asyncio.sleep(30, "late"))
        guarded = asyncio.ensure_future(
            until_disconnect(FakeRequest(), work, on_orphan=orphans.append)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.01)
        guarded.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guarded
        await asyncio.sleep(0)
        return work.cancelled(), orphans

    cancelled, orphans = run(main())
    assert cancelled
    assert orphans == []


def test_result_arriving_with_the_cancellation_goes_to_on_orphan() -> None:
    """The work finishes in the same loop iteration as the caller's cancellation (server
    shutdown just as an upstream stream opened): the result reaches nobody, so it is
    handed to `on_orphan` (for a stream: close its connection)."""

    async def main() -> list[str]:
        orphans: list[str] = []
        await cancel_as_work_finishes(orphans.append)
        return orphans

    assert run(main()) == ["open stream"]


def test_result_arriving_with_the_disconnect_goes_to_on_orphan() -> None:
    """The client leaves and the work then finishes while being cancelled: a result that
    ignores the cancellation is disposed of, not dropped."""

    async def stubborn() -> str:
        # Swallows its cancellation, as a call finishing in that very iteration would.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        return "open stream"

    async def main() -> list[str]:
        request = FakeRequest()
        orphans: list[str] = []
        asyncio.get_running_loop().call_later(0.02, request.gone.set)
        with pytest.raises(ClientDisconnected):
            await until_disconnect(request, stubborn(), on_orphan=orphans.append)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return orphans

    assert run(main()) == ["open stream"]


def test_a_failing_cleanup_is_logged_not_raised() -> None:
    def explode(_: str) -> None:
        raise RuntimeError("close failed")

    async def main() -> list[dict[str, Any]]:
        loop_errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        await cancel_as_work_finishes(explode)
        return loop_errors

    assert run(main()) == []


def test_an_admission_slot_won_as_the_caller_is_cancelled_is_released() -> None:
    """The chat service's use: a queued request is handed a slot in the loop iteration
    where it is cancelled; with `Ticket.release` as `on_orphan` the slot is not lost."""

    async def main() -> tuple[int, int]:
        admission = AdmissionController(max_in_flight=1, max_queue=4, queue_timeout_s=10)
        holder = admission.try_acquire()
        assert holder is not None
        queued = asyncio.ensure_future(admission.acquire())
        guarded = asyncio.ensure_future(
            until_disconnect(FakeRequest(), queued, on_orphan=Ticket.release)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.01)
        holder.release()  # the slot moves to the queued request
        while not queued.done():
            await asyncio.sleep(0)
        guarded.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guarded
        await asyncio.sleep(0)
        return admission.in_flight, admission.queued

    assert run(main()) == (0, 0)


def test_after_a_disconnect_the_caller_runs_on_uncancelled() -> None:
    """The watcher cancels the caller's own task to stop the work; that cancellation is
    taken back, so the caller's clean-up can still await (send an abort, record)."""

    async def main() -> int:
        request = FakeRequest()
        asyncio.get_running_loop().call_later(0.02, request.gone.set)
        with pytest.raises(ClientDisconnected):
            await until_disconnect(request, asyncio.sleep(30))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # would raise CancelledError if one were left pending
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert run(main()) == 0


def test_a_disconnect_with_the_result_never_cancels_what_follows() -> None:
    """The client leaves in the loop iteration where the work's result arrives: either
    the result is returned or ClientDisconnected raised, and in neither case does the
    watcher's late callback cancel the caller afterwards."""

    async def main() -> str:
        request = FakeRequest()
        work: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def finish_together() -> None:
            await asyncio.sleep(0.01)
            work.set_result("result")
            request.gone.set()

        helper = asyncio.ensure_future(finish_together())
        try:
            outcome = await until_disconnect(request, work)  # type: ignore[arg-type]
        except ClientDisconnected:
            outcome = "disconnected"
        for _ in range(5):
            await asyncio.sleep(0.005)
        await helper
        return outcome

    assert run(main()) in ("result", "disconnected")


def test_a_server_shutdown_during_a_disconnect_stays_a_cancellation() -> None:
    async def main() -> None:
        request = FakeRequest()

        async def guarded() -> None:
            await until_disconnect(request, asyncio.sleep(30))  # type: ignore[arg-type]

        call = asyncio.ensure_future(guarded())
        await asyncio.sleep(0.01)
        request.gone.set()
        while call.cancelling() == 0:  # until the watcher has cancelled it
            await asyncio.sleep(0)
        call.cancel()  # and the server too, before the first was delivered
        with pytest.raises(asyncio.CancelledError):
            await call

    run(main())
