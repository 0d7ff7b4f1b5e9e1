"""The engine's HTTP/1.1 client (service/engine/http_pool.py) against raw socket servers that
send exactly the bytes each test scripts: framing split at awkward places, connections
the server closes, extra bytes, broken heads. The first property is that a connection
is reused only when its last response was read to its exact end, so no request can read
another's response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from service.engine.http_pool import ConnectFailed, HttpTransportError, Pool, ResponseTimeout

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
    """Runs `handler(reader, writer, connection_number)` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0

    async def __aenter__(self) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while True:
        body = await read_request(reader)
        writer.write(reply(b"conn%d:" % n + body))
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


async def fetch(pool: Pool, body: bytes) -> bytes:
    resp = await pool.request("POST", "/x", body, head_timeout_s=5)
    try:
        return await resp.read(5)
    finally:
        resp.release()


def test_sequential_requests_share_one_keep_alive_connection():
    async def scenario() -> None:
        server = Server(echo_forever)
        async with server as url:
            pool = Pool(url, limit=4, keepalive_s=10)
            assert [await fetch(pool, b"%d" % i) for i in range(5)] == [
                b"conn1:%d" % i for i in range(5)
            ]
            assert server.connections == 1
            pool.close()

    run(scenario())


def test_a_response_left_unread_is_never_reused():
    """A second request on that connection would read the first one's remaining bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            writer.write(reply(b"conn%d:" % n + body + b"-" * 100_000))
            await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            pool = Pool(url, limit=4, keepalive_s=10)
            first = await pool.request("POST", "/x", b"a", head_timeout_s=5)
            first.release()  # body unread: the connection must be closed, not pooled
            assert (await fetch(pool, b"b")).startswith(b"conn2:b")
            pool.close()

    run(scenario())


def test_chunked_bodies_split_anywhere_arrive_whole_and_in_order():
    chunks = [b"data: one\n\n", b"data: two\n\n", b"x" * 5000, b"data: [DONE]\n\n"]
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
            pool = Pool(url, limit=1, keepalive_s=10)
            for _ in range(2):
                resp = await pool.request("POST", "/x", b"{}", head_timeout_s=5)
                parts = [part async for part in resp.iter_data(5)]
                assert b"".join(parts) == b"".join(chunks)
                assert resp.at_end
                resp.release()
            assert server.connections == 1  # read to its end: reused
            pool.close()

    run(scenario())


def test_chunks_already_buffered_are_delivered_together():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"2\r\nab\r\n2\r\ncd\r\n")  # one burst
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"2\r\nef\r\n0\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with Server(handler) as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            resp = await pool.request("POST", "/x", b"{}", head_timeout_s=5)
            await asyncio.sleep(0.1)
            assert [part async for part in resp.iter_data(5)] == [b"abcd", b"ef"]
            resp.release()
            pool.close()

    run(scenario())


def test_a_pooled_connection_the_server_closed_is_replaced_transparently():
    """The race an idle timeout makes: the server closes a kept-alive connection just as
    the next request goes out on it. Nothing was answered, so the request is sent again
    on a fresh connection; a request that got any answer byte is never sent twice."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(reader)
        writer.write(reply(b"conn%d:" % n + body))
        await writer.drain()
        if n == 1:
            await read_request(reader)  # the second request arrives; it is dropped
            return
        while True:
            body = await read_request(reader)
            writer.write(reply(b"conn%d:" % n + body))
            await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            assert await fetch(pool, b"a") == b"conn1:a"
            assert await fetch(pool, b"b") == b"conn2:b"
            assert server.connections == 2
            pool.close()

    run(scenario())


async def answer_in_part(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200")  # part of a head, then the connection ends


async def work_then_drop(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(0.3)  # the engine works on it, then the connection drops


@pytest.mark.parametrize("second_answer", [answer_in_part, work_then_drop])
def test_a_request_the_engine_may_have_taken_is_not_sent_again(second_answer):
    """A reused connection that failed after part of an answer, or well after the
    request went out (an engine crash, say): resending could start it twice."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(reader)
        writer.write(reply(body))
        await writer.drain()
        await read_request(reader)
        await second_answer(writer)

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            assert await fetch(pool, b"a") == b"a"
            with pytest.raises(HttpTransportError):
                await fetch(pool, b"b")
            assert server.connections == 1
            pool.close()

    run(scenario())


def test_connection_close_and_extra_bytes_stop_reuse():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            if n == 1:
                writer.write(reply(body, b"Connection: close\r\n"))
            elif n == 2:
                writer.write(reply(body) + b"GARBAGE")  # more than the framing says
            else:
                writer.write(reply(b"conn%d:" % n + body))
            await writer.drain()

    async def scenario() -> None:
        server = Server(handler)
        async with server as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            assert await fetch(pool, b"a") == b"a"
            assert await fetch(pool, b"b") == b"b"
            assert await fetch(pool, b"c") == b"conn3:c"
            pool.close()

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
    ],
)
def test_malformed_or_truncated_responses_fail_cleanly(wire: bytes):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(wire)
        await writer.drain()

    async def scenario() -> None:
        async with Server(handler) as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            with pytest.raises(HttpTransportError):
                await fetch(pool, b"{}")
            pool.close()

    run(scenario())


def test_limits_and_timeouts():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with Server(silent) as url:
            pool = Pool(url, limit=1, keepalive_s=10)
            with pytest.raises(ResponseTimeout):
                await pool.request("POST", "/x", b"{}", head_timeout_s=0.2)
            held = asyncio.ensure_future(pool.request("POST", "/x", b"{}", head_timeout_s=5))
            await asyncio.sleep(0.1)
            # The only slot is taken: waiting for it counts against the connect bound.
            with pytest.raises(ConnectFailed):
                await pool.request("POST", "/x", b"{}", slot_and_connect_timeout_s=0.2)
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
            # The cancelled request gave its slot back.
            with pytest.raises(ResponseTimeout):
                await pool.request(
                    "POST", "/x", b"{}", slot_and_connect_timeout_s=1, head_timeout_s=0.2
                )
            pool.close()

    run(scenario())


def test_a_drain_cancelled_midway_still_gives_the_connection_back():
    """Closing a finished stream waits briefly for the body's end (to keep the
    connection); cancelled during that wait (server shutdown), the connection is closed
    and its pool slot freed, or the pool would shrink by one for good."""
    from service.engine.client import EngineClient

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
            client = EngineClient(url, connect_timeout_s=1, read_timeout_s=5, max_connections=1)
            stream = await client.open_stream({"stream": True})
            batches = [batch async for batch in _first(stream.line_batches())]
            assert batches == [[b"data: [DONE]", b""]]
            closing = asyncio.ensure_future(stream.aclose(drain=True))
            await asyncio.sleep(0.05)
            assert not closing.done()  # waiting for the terminating chunk
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            # The only slot is free again: the next request gets a connection at once.
            assert await client.chat({"stream": False}) == {"ok": True}
            await client.aclose()

    run(scenario())


async def _first(batches):
    async for batch in batches:
        yield batch
        return
