"""The embedded engine's restart backoff, with an engine command that dies at once.

The real SGLang child is exercised by test_reliability_engine (kill -> 503 -> recovery);
here a one-line Python "engine" that records its start time and exits lets the test see
the spacing of restarts: the backoff doubles after each failed start, up to its cap.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from service.engine.client import EngineClient
from service.engine.supervisor import EmbeddedEngine, EngineState
from service.server.settings import Settings
from tests.support.sglang_server import free_port

BACKOFF, CAP = 0.5, 2.0


class DyingEngine(EmbeddedEngine):
    def __init__(self, settings: Settings, client: EngineClient, starts: Path) -> None:
        super().__init__(settings, client)
        self.starts = starts

    def command(self, model_path: Path) -> list[str]:
        record = f"import time; open({str(self.starts)!r}, 'a').write(f'{{time.time()}}\\n')"
        return [sys.executable, "-c", record + "; raise SystemExit(3)"]


def test_failed_starts_back_off_exponentially_up_to_the_cap(tmp_path):
    starts = tmp_path / "starts.txt"

    async def run() -> DyingEngine:
        port = free_port()  # nothing listens: every health probe fails at once
        settings = Settings(
            model_path=str(tmp_path),
            engine_port=port,
            engine_restart_backoff_s=BACKOFF,
            engine_restart_backoff_max_s=CAP,
        )
        client = EngineClient(
            f"http://127.0.0.1:{port}", connect_timeout_s=1, read_timeout_s=1, max_connections=4
        )
        engine = DyingEngine(settings, client, starts)
        await engine.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while len(_times(starts)) < 5:
                assert asyncio.get_running_loop().time() < deadline, _times(starts)
                assert not engine.ready
                await asyncio.sleep(0.05)
        finally:
            await engine.stop()
            await client.aclose()
        return engine

    engine = asyncio.run(run())
    assert engine.state is EngineState.STOPPED and engine.restarts >= 4
    times = _times(starts)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Each gap is the backoff plus noticing the exit (a 0.5 s poll) and a Python start.
    for gap, backoff in zip(gaps, (0.5, 1.0, 2.0, 2.0), strict=False):
        # Under 1.9 s of slack: a capped 2 s backoff is still told from an uncapped 4 s.
        assert backoff <= gap < backoff + 1.9, (gaps, backoff)


def _times(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []
