"""A rich progress bar for a run: requests done out of the planned count, and time used
out of the duration (whichever bound ends the run first)."""

from __future__ import annotations

import time
from collections import Counter
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.client import RequestRecord


class ProgressSink(Protocol):
    def request_done(self, record: RequestRecord) -> None: ...

    def tick(self) -> None: ...


class NoProgress:
    def request_done(self, record: RequestRecord) -> None:
        pass

    def tick(self) -> None:
        pass


class RichProgress:
    def __init__(self, num_requests: int, duration_s: float, console: Console | None = None):
        self._duration_s = duration_s
        self._outcomes: Counter[str] = Counter()
        self._start = time.perf_counter()
        self._progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            TextColumn("{task.completed:>6.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._requests = self._progress.add_task("requests", total=num_requests, status="")
        self._time = self._progress.add_task("seconds", total=duration_s, status="")

    def __enter__(self) -> RichProgress:
        self._start = time.perf_counter()
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.tick()
        self._progress.stop()

    def request_done(self, record: RequestRecord) -> None:
        self._outcomes[record.outcome] += 1
        status = " ".join(f"{k}:{v}" for k, v in sorted(self._outcomes.items()))
        self._progress.update(self._requests, advance=1, status=status)
        self.tick()

    def tick(self) -> None:
        elapsed = min(time.perf_counter() - self._start, self._duration_s)
        self._progress.update(self._time, completed=elapsed)
