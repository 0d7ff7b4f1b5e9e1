"""Bounds of the gateway's upstream client that need an engine misbehaving at the socket
level: one that accepts connections and never reads what it is sent."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from service.engine.client import EngineClient, EngineTimeout

# Far more than loopback socket buffers hold, so the body's write blocks.
BIG_BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * (48 << 20)}]}


@pytest.fixture
def deaf_engine() -> Iterator[str]:
    """A listening socket nobody accepts from: the kernel completes connections into the
    backlog and buffers what arrives until the buffers are full, then writes block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_the_engine_never_reads_times_out(deaf_engine: str, stream: bool) -> None:
    """The read timeout starts only once the body is written; without the write bound
    this request would wait forever (the outer wait_for turns that into a failure)."""

    async def scenario() -> float:
        client = EngineClient(
            deaf_engine,
            connect_timeout_s=1,
            read_timeout_s=0.5,
            max_connections=1,
            write_timeout_s=0.5,
        )
        started = time.monotonic()
        try:
            call = client.open_stream(BIG_BODY) if stream else client.chat(BIG_BODY)
            with pytest.raises(EngineTimeout):
                await asyncio.wait_for(call, 20)
        finally:
            await client.aclose()
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    # write bound + read timeout = 1 s until the headers, plus building a 48 MB body.
    assert elapsed < 10
