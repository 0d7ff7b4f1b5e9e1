"""`until_disconnect`: upstream work raced against the client leaving, and what happens to
a result nobody can take (an open upstream stream must be closed, not garbage-collected).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from service.chat.admission import AdmissionController
from service.chat.disconnect_guard import ClientDisconnected, until_disconnect


class Client:
    """What the guard reads of the ASGI exchange: receive() blocks until a disconnect."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.listening = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        self.listening.set()
        await self.gone.wait()
        return {"type": "http.disconnect"}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


class Work:
    """Upstream work that runs until released, and says whether it was cancelled."""

    def __init__(self, result: str = "open stream") -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.result = result

    async def __call__(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.result


async def collect(orphans: list[str], result: str) -> None:
    orphans.append(result)


def test_returns_the_work_result() -> None:
    async def main() -> str:
        work = Work("done")
        work.release.set()
        return await until_disconnect(Client().receive, work())

    assert run(main()) == "done"


def test_work_errors_propagate_as_themselves() -> None:
    async def boom() -> None:
        raise ValueError("engine said no")

    async def main() -> None:
        await until_disconnect(Client().receive, boom())

    with pytest.raises(ValueError, match="engine said no"):
        run(main())


def test_client_leaving_cancels_the_work() -> None:
    async def main() -> tuple[bool, list[str]]:
        client, work, orphans = Client(), Work(), []
        guarded = asyncio.ensure_future(
            until_disconnect(client.receive, work(), on_orphan=lambda r: collect(orphans, r))
        )
        await work.started.wait()
        await client.listening.wait()
        client.gone.set()
        with pytest.raises(ClientDisconnected):
            await guarded
        return work.cancelled, orphans

    assert run(main()) == (True, [])


def test_caller_cancelled_while_waiting_cancels_the_work() -> None:
    async def main() -> tuple[bool, list[str]]:
        work, orphans = Work(), []
        guarded = asyncio.ensure_future(
            until_disconnect(Client().receive, work(), on_orphan=lambda r: collect(orphans, r))
        )
        await work.started.wait()
        guarded.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guarded
        return work.cancelled, orphans

    assert run(main()) == (True, [])


def test_result_arriving_with_the_disconnect_goes_to_on_orphan() -> None:
    """The client leaves while the work finishes (a call that completes in the very
    iteration of its cancellation): a result nobody takes is disposed of, not dropped."""

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return "open stream"

    async def main() -> list[str]:
        client, orphans = Client(), []
        guarded = asyncio.ensure_future(
            until_disconnect(client.receive, stubborn(), on_orphan=lambda r: collect(orphans, r))
        )
        await client.listening.wait()
        client.gone.set()
        with pytest.raises(ClientDisconnected):
            await guarded
        return orphans

    assert run(main()) == ["open stream"]


def test_either_the_result_or_the_disconnect_never_both_lost() -> None:
    """The work returns in the iteration where the client leaves: the caller gets the
    result, or ClientDisconnected with the result handed to `on_orphan`."""

    async def main() -> tuple[str, list[str]]:
        client, orphans = Client(), []

        async def finish_as_the_client_leaves() -> str:
            await client.listening.wait()
            client.gone.set()
            return "open stream"

        try:
            outcome = await until_disconnect(
                client.receive,
                finish_as_the_client_leaves(),
                on_orphan=lambda r: collect(orphans, r),
            )
        except ClientDisconnected:
            outcome = "disconnected"
        return outcome, orphans

    outcome, orphans = run(main())
    assert (outcome, orphans) in (("open stream", []), ("disconnected", ["open stream"]))


def test_a_failing_cleanup_is_logged_not_raised() -> None:
    async def explode(_: str) -> None:
        raise RuntimeError("close failed")

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return "open stream"

    async def main() -> None:
        client = Client()
        guarded = asyncio.ensure_future(
            until_disconnect(client.receive, stubborn(), on_orphan=explode)
        )
        await client.listening.wait()
        client.gone.set()
        with pytest.raises(ClientDisconnected):
            await guarded

    run(main())


def test_an_admission_slot_won_as_the_caller_is_cancelled_is_released() -> None:
    """The chat service's use: a queued request is handed a slot in the loop iteration
    where it is cancelled; the slot passes on instead of being lost."""

    async def main() -> tuple[int, int]:
        admission = AdmissionController(max_in_flight=1, max_queue=4, queue_timeout_s=10)
        holder = admission.try_acquire()
        assert holder is not None
        guarded = asyncio.ensure_future(until_disconnect(Client().receive, admission.acquire()))
        while admission.queued == 0:
            await asyncio.sleep(0)
        holder.release()  # the slot moves to the queued request
        guarded.cancel()  # in the same iteration
        with pytest.raises(asyncio.CancelledError):
            await guarded
        return admission.in_flight, admission.queued

    assert run(main()) == (0, 0)


def test_after_a_disconnect_the_caller_runs_on_uncancelled() -> None:
    """The disconnect cancels the work through the guard's own scope; the caller's
    clean-up can still await (send an abort, record)."""

    async def main() -> int:
        client, work = Client(), Work()

        async def leave() -> None:
            await work.started.wait()
            await client.listening.wait()
            client.gone.set()

        leaving = asyncio.ensure_future(leave())
        with pytest.raises(ClientDisconnected):
            await until_disconnect(client.receive, work())
        await leaving
        await asyncio.sleep(0)  # would raise CancelledError if one were left pending
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert run(main()) == 0


def test_a_server_shutdown_during_a_disconnect_stays_a_cancellation() -> None:
    async def main() -> None:
        client, work = Client(), Work()
        call = asyncio.ensure_future(until_disconnect(client.receive, work()))
        await work.started.wait()
        await client.listening.wait()
        client.gone.set()
        call.cancel()  # the server too, before the disconnect was acted on
        with pytest.raises(asyncio.CancelledError):
            await call

    run(main())
