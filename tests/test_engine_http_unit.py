"""The engine client (service/engine/client.py) against raw socket servers that send
exactly the bytes each test scripts: framing split at awkward places, connections the
server closes, extra bytes, broken or oversized responses. The properties: a request is
sent at most once, a connection is reused only after a response read to its exact end,
and nothing the engine sends is buffered without bound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from service.engine import client as client_module
from service.engine.client import EngineClient, EngineTimeout, EngineUnavailable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def reply(body: bytes, extra_headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra_headers) + body


class Server:
    """Runs `handler(reader, writer, connection_number)` per connection and counts the
    requests it read (`requests`), so a test can tell a request sent twice."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0  # connections this side has closed

    async def __aenter__(self) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                self.closed += 1

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


def echo(n: int, body: bytes) -> bytes:
    return reply(b'{"conn": %d, "body": %s}' % (n, body))


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while True:
        writer.write(echo(n, await read_request(reader)))
        await writer.drain()


def client_for(url: str, **overrides: float) -> EngineClient:
    options = {"connect_timeout_s": 1.0, "read_timeout_s": 5.0, "max_connections": 1}
    return EngineClient(url, **{**options, **overrides})  # type: ignore[arg-type]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool]) -> None:
    """Poll until `predicate` holds; `run`'s deadline bounds the wait."""
    while not predicate():
        await asyncio.sleep(0.001)


def test_sequential_requests_share_one_keep_alive_connection():
    async def scenario() -> None:
        server = Server(echo_forever)
        async with server as url:
            client = client_for(url)
            answers = [await client.chat({"i": i}) for i in range(5)]
            assert answers == [{"conn": 1, "body": {"i": i}} for i in range(5)]
            assert server.connections == 1
            await client.aclose()

    run(scenario())


def test_a_stream_closed_before_its_end_is_never_reused():
    """A second request on that connection would read the first one's remaining bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            writer.write(reply(b'{"conn": %d, "body": %s}' % (n, body) + b" " * 100_000))
            await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            stream = await client.open_stream({"stream": True})
            await stream.aclose()  # body unread: the connection is closed, not pooled
            assert (await client.chat({"b": 1}))["conn"] == 2
            await client.aclose()

    run(scenario())


def test_chunked_bodies_split_anywhere_arrive_whole_and_in_order():
    chunks = [b"data: one\n\n", b"data: two\n\n", b"x" * 5000 + b"\n", b"data: [DONE]\n\n"]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nT: v\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            data = head + wire
            for i in range(0, len(data), 7):  # 7-byte writes: splits inside every token
                writer.write(data[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            for _ in range(2):
                stream = await client.open_stream({"stream": True})
                lines = [line async for batch in stream.line_batches() for line in batch]
                assert b"\n".join(lines) + b"\n" == b"".join(chunks)
                await stream.aclose(drain=True)
            assert server.connections == 1  # read to its end: reused
            await client.aclose()

    run(scenario())


def test_a_connection_the_server_closed_while_idle_is_replaced():
    """The server ends a kept-alive connection between two requests (its idle timeout):
    nothing was sent on it, so the next request goes out, once, on a fresh one."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(reader)
        seen.append(body)
        writer.write(echo(n, body))
        await writer.drain()
        if n > 1:
            await echo_forever(reader, writer, n)

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            assert (await client.chat({"a": 1}))["conn"] == 1
            await until(lambda: server.closed == 1)  # its FIN is in the client's socket
            assert (await client.chat({"b": 2}))["conn"] == 2
            assert seen == [b'{"a":1}', b'{"b":2}']
            await client.aclose()

    run(scenario())


async def drop_after_part_of_a_head(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200")  # part of a head, then the connection ends


async def drop_after_working(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(0.3)  # the engine works on it, then the connection drops


@pytest.mark.parametrize("second_answer", [drop_after_part_of_a_head, drop_after_working])
def test_a_request_the_engine_may_have_taken_is_never_sent_again(second_answer):
    """A reused connection that failed after the request went out (an engine crash, say):
    resending could start it twice, so the caller gets the failure."""
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(reader)
        requests.append(body)
        writer.write(reply(body))
        await writer.drain()
        requests.append(await read_request(reader))
        await second_answer(writer)

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            assert await client.chat({"a": 1}) == {"a": 1}
            with pytest.raises(EngineUnavailable):
                await client.chat({"b": 2})
            assert requests == [b'{"a":1}', b'{"b":2}']
            assert server.connections == 1
            await client.aclose()

    run(scenario())


def test_connection_close_and_extra_bytes_stop_reuse():
    """After `Connection: close` the next request takes a new connection. Bytes past a
    response's framing are read as the next response's head, which they do not parse as:
    that request fails (once, not sent again) and its connection is dropped."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            if n == 1:
                writer.write(reply(body, b"Connection: close\r\n"))
            elif n == 2:
                writer.write(reply(body) + b"GARBAGE")  # more than the framing says
            else:
                writer.write(echo(n, body))
            await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            assert await client.chat({"a": 1}) == {"a": 1}
            assert await client.chat({"b": 2}) == {"b": 2}
            with pytest.raises(EngineUnavailable):
                await client.chat({"c": 3})
            assert (await client.chat({"d": 4}))["conn"] == 3
            await client.aclose()

    run(scenario())


@pytest.mark.parametrize(
    "wire",
    [
        b"HTXP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then closed
        # Framed twice: how request smuggling starts; refused, never read or pooled.
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        # A head past h11's bound (100 KiB) is not buffered further.
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["version", "status", "length", "coding", "chunk", "truncated", "both", "big-head"],
)
def test_malformed_truncated_or_oversized_responses_fail_cleanly(wire: bytes):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 1:
            await echo_forever(reader, writer, n)
            return
        await read_request(reader)
        writer.write(wire)
        await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            client = client_for(url)
            with pytest.raises(EngineUnavailable):
                await client.chat({})
            # That connection is gone: the next request gets a fresh one.
            assert (await client.chat({"ok": 1}))["conn"] == 2
            await client.aclose()

    run(scenario())


def test_bodies_and_stream_lines_are_bounded(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_BODY_BYTES", 1000)
    monkeypatch.setattr(client_module, "MAX_LINE_BYTES", 1000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:  # a declared length over the bound
            writer.write(reply(b"[" + b"0," * 1000 + b"0]"))
        elif n == 2:  # chunked, no length declared, past the bound
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"400\r\n" + b" " * 1024 + b"\r\n" * 2)
        else:  # a stream line that never ends
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(4):
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def scenario() -> None:
        async with Server(handler) as url:
            client = client_for(url, max_connections=4)
            for _ in range(2):
                with pytest.raises(EngineUnavailable):
                    await client.chat({})
            stream = await client.open_stream({"stream": True})
            with pytest.raises(EngineUnavailable):
                async for _ in stream.line_batches():
                    pass
            await stream.aclose()
            await client.aclose()

    run(scenario())


def test_timeouts_and_the_connection_limit():
    requests = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal requests
        await read_request(reader)
        requests += 1
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with Server(silent) as url:
            client = client_for(url, connect_timeout_s=0.2, read_timeout_s=0.2)
            with pytest.raises(EngineTimeout):  # took the request, then silence
                await client.chat({})
            stream_client = client_for(url, connect_timeout_s=0.2, read_timeout_s=30)
            held = asyncio.ensure_future(stream_client.chat({}))
            await until(lambda: requests == 2)  # the server has it: its connection is taken
            # The only connection is busy: waiting for it counts as not connecting.
            with pytest.raises(EngineUnavailable):
                await stream_client.chat({})
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
            await client.aclose()
            await stream_client.aclose()

    run(scenario())


def test_a_drain_cancelled_midway_still_gives_the_connection_back():
    """Closing a finished stream waits briefly for the body's end (to keep the
    connection); cancelled during that wait (server shutdown), the connection is closed
    and its pool slot freed, or the pool would shrink by one for good."""

    async def stream_then_stall(reader, writer, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")  # no terminating chunk: stalls
            await writer.drain()
            await asyncio.sleep(30)
        else:
            writer.write(reply(b'{"ok": true}'))
            await writer.drain()

    async def scenario() -> None:
        async with Server(stream_then_stall) as url:
            client = client_for(url)
            stream = await client.open_stream({"stream": True})
            batches = [batch async for batch in _first(stream.line_batches())]
            assert batches == [[b"data: [DONE]", b""]]
            closing = asyncio.ensure_future(stream.aclose(drain=True))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not closing.done()  # waiting for the terminating chunk
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            # The only slot is free again: the next request gets a connection at once.
            assert await client.chat({"stream": False}) == {"ok": True}
            assert client.activity.in_flight == 0
            await client.aclose()

    run(scenario())


async def _first(batches):
    async for batch in batches:
        yield batch
        return
