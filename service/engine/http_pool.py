"""A small HTTP/1.1 client for the engine: keep-alive connections over asyncio and little
else.

Why not a general client: measured side by side (docs/benchmarks.md, "Where the rest
goes"), aiohttp's request machinery was the largest piece of the gateway's cold path
left, about 0.44 ms and a fifth of the CPU of a cold request. The engine is one known
HTTP/1.1 server; what the gateway needs is JSON requests, Content-Length and chunked
bodies, a bounded keep-alive pool and timeouts: no redirects, cookies, proxies or
compression.

Safety: a connection goes back to the pool only after its response was read to the
exact end of its framing (Content-Length, or the terminating chunk) with no byte left
over; any other ending closes it. No response can be read by another request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 << 10
# Past this much unread data the socket stops being read until the consumer catches up.
HIGH_WATER_BYTES = 1 << 20
# A reused connection that fails this soon after the request went out, with no byte
# answered, was closed by the engine while idle; the request is sent once more.
STALE_RETRY_WINDOW_S = 0.05


class HttpTransportError(Exception):
    """The exchange failed at the transport or protocol level."""


class ConnectFailed(HttpTransportError):
    """No connection could be made (refused, unreachable, or the connect timed out)."""


class ResponseTimeout(TimeoutError):
    """The engine stayed silent past a read timeout."""


class _Connection(asyncio.Protocol):
    """One socket with a read buffer that the response parser consumes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False  # the peer ended the connection, or it failed
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self.received_any = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received_any = True
        if len(self.buffer) > HIGH_WATER_BYTES and self._waiter is None and self.transport:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        self._wake_drain()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading ---
    async def _more(self) -> None:
        """Wait for more data; raises when the connection has ended instead."""
        if self.closed:
            raise HttpTransportError(f"connection closed by the engine{self._why()}")
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _why(self) -> str:
        return f": {self.error}" if self.error else ""

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        start = 0
        while True:
            index = self.buffer.find(separator, start)
            if index >= 0:
                end = index + len(separator)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if len(self.buffer) > limit:
                raise HttpTransportError("malformed response: line or head too long")
            start = max(0, len(self.buffer) - len(separator) + 1)
            await self._more()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._more()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_some(self, at_most: int) -> bytes:
        """What is buffered (up to `at_most`), waiting for something if nothing is."""
        while not self.buffer:
            await self._more()
        data = bytes(self.buffer[:at_most])
        del self.buffer[:at_most]
        return data

    async def read_to_eof(self) -> bytes:
        while not self.closed:
            await self._wait_quietly()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def _wait_quietly(self) -> None:
        with contextlib.suppress(HttpTransportError):
            await self._more()

    # --- writing ---
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Until the socket takes what was written (down to the transport's low mark)."""
        while self._write_paused:
            if self.closed:
                raise HttpTransportError(f"connection closed by the engine{self._why()}")
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    # --- the rest ---
    def reusable(self, now: float, keepalive_s: float) -> bool:
        return (
            self.clean()
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < keepalive_s
        )

    def clean(self) -> bool:
        """Nothing left over in either direction: fit for the next request."""
        return (
            not self.closed
            and not self.buffer
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
        )

    def idle(self) -> None:
        """Parked in the pool: keep reading, so that the engine closing it is noticed."""
        self.idle_since = time.monotonic()
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            # Data still queued for an engine that stopped reading would keep a closed
            # transport (and its buffer) alive: drop it instead.
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()


@dataclass
class _Framing:
    chunked: bool
    remaining: int | None  # Content-Length left to read; None: until the connection ends
    chunk_left: int = 0  # bytes of the current chunk still to read (chunked)
    done: bool = False


class Response:
    """A response whose head has been read; the body is read through this object, and
    `release()` (or `close()`) must always follow."""

    def __init__(
        self,
        pool: Pool,
        conn: _Connection,
        status: int,
        headers: dict[str, str],
        framing: _Framing,
        keep_alive: bool,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._framing = framing
        self._keep_alive = keep_alive

    @property
    def at_end(self) -> bool:
        return self._framing.done

    async def read(self, read_timeout_s: float | None) -> bytes:
        parts = [part async for part in self.iter_data(read_timeout_s)]
        return b"".join(parts)

    async def iter_data(self, read_timeout_s: float | None) -> AsyncIterator[bytes]:
        """The body as it arrives: each item is what one wake-up found (every chunk
        already buffered, not one item per chunk). Raises ResponseTimeout past
        `read_timeout_s` of silence and HttpTransportError when the body breaks off."""
        while not self._framing.done:
            try:
                async with asyncio.timeout(read_timeout_s):
                    data = await self._next_data()
            except TimeoutError:
                raise ResponseTimeout(f"the engine went silent for {read_timeout_s}s") from None
            if data:
                yield data

    async def _next_data(self) -> bytes:
        conn = self._connection()
        framing = self._framing
        if not framing.chunked:
            if framing.remaining is None:
                data = await conn.read_to_eof()
                framing.done = True
                return data
            if framing.remaining == 0:
                framing.done = True
                return b""
            data = await conn.read_some(framing.remaining)
            framing.remaining -= len(data)
            framing.done = framing.remaining == 0
            return data
        out = bytearray()
        while True:
            if framing.chunk_left == 0:
                if out and not _complete_line_buffered(conn):
                    return bytes(out)  # deliver what we have; the next size line is not here
                size = await _chunk_size(conn)
                if size == 0:
                    await _skip_trailers(conn)
                    framing.done = True
                    return bytes(out)
                framing.chunk_left = size
            if out and not conn.buffer:
                return bytes(out)
            data = await conn.read_some(framing.chunk_left)
            framing.chunk_left -= len(data)
            out += data
            if framing.chunk_left == 0 and await conn.read_exactly(2) != b"\r\n":
                raise HttpTransportError("malformed chunked body")

    def _connection(self) -> _Connection:
        if self._conn is None:
            raise HttpTransportError("response already released")
        return self._conn

    def release(self) -> None:
        """Hand the connection back if the body was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool.give_back(conn, reusable=self._framing.done and self._keep_alive)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.give_back(conn, reusable=False)


def _complete_line_buffered(conn: _Connection) -> bool:
    return b"\r\n" in conn.buffer


async def _chunk_size(conn: _Connection) -> int:
    line = await conn.read_until(b"\r\n", 1024)
    try:
        size = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise HttpTransportError("malformed chunk size") from None
    if size < 0:
        raise HttpTransportError("malformed chunk size")
    return size


async def _skip_trailers(conn: _Connection) -> None:
    while await conn.read_until(b"\r\n", MAX_HEAD_BYTES) != b"\r\n":
        pass


def _parse_head(raw: bytes) -> tuple[int, bool, dict[str, str]]:
    """Status, whether the version keeps connections alive by default, and headers."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpTransportError(f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HttpTransportError("malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(parts[1]), parts[0] == b"HTTP/1.1", headers


def _framing(status: int, headers: dict[str, str]) -> _Framing:
    if status in (204, 304) or 100 <= status < 200:
        return _Framing(chunked=False, remaining=0, done=True)
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            raise HttpTransportError(f"unsupported transfer encoding {encoding!r}")
        return _Framing(chunked=True, remaining=None)
    length = headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise HttpTransportError(f"malformed content-length {length!r}")
        return _Framing(chunked=False, remaining=int(length), done=int(length) == 0)
    return _Framing(chunked=False, remaining=None)


class Pool:
    """Keep-alive connections to one engine, at most `limit` in use at once."""

    def __init__(self, base_url: str, *, limit: int, keepalive_s: float) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._host_header = url.netloc.encode("idna")
        self._keepalive_s = keepalive_s
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        slot_and_connect_timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
        write_timeout_s: float | None = None,
        head_timeout_s: float | None = None,
    ) -> Response:
        """Send a request and read the response's head.

        `slot_and_connect_timeout_s` bounds waiting for a free slot, and then each
        connect unless `connect_timeout_s` bounds those (either raises ConnectFailed).
        `write_timeout_s` bounds handing the request to the socket and `head_timeout_s`
        the wait for the response's head after that (either raises ResponseTimeout).
        Without a bound the slot wait is unbounded: callers bound the whole call.
        """
        request = self._encode(method, path, body)
        try:
            async with asyncio.timeout(slot_and_connect_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ConnectFailed("timed out waiting for a free engine connection") from None
        try:
            return await self._exchange(
                request,
                connect_timeout_s or slot_and_connect_timeout_s,
                write_timeout_s,
                head_timeout_s,
            )
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self,
        request: bytes,
        connect_timeout_s: float | None,
        write_timeout_s: float | None,
        head_timeout_s: float | None,
    ) -> Response:
        # A pooled connection the engine closed just as it was taken fails at once, with
        # no response byte: the request never reached the engine, so it goes once more
        # on a fresh connection. A connection that fails later may have carried a
        # request the engine was working on: never sent twice.
        for attempt in (0, 1):
            conn = self._take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(connect_timeout_s)
            sent_at = time.monotonic()
            try:
                conn.write(request)
                async with asyncio.timeout(write_timeout_s):
                    await conn.drain()
                async with asyncio.timeout(head_timeout_s):
                    raw = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
                    status, keep_alive, headers = _parse_head(raw)
                    while 100 <= status < 200:  # interim responses carry no body
                        raw = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
                        status, keep_alive, headers = _parse_head(raw)
            except TimeoutError:
                conn.close()
                raise ResponseTimeout("the engine sent no response in time") from None
            except HttpTransportError:
                conn.close()
                stale = time.monotonic() - sent_at < STALE_RETRY_WINDOW_S
                if reused and not conn.received_any and stale:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            connection = headers.get("connection", "").lower()
            if "close" in connection:
                keep_alive = False
            elif "keep-alive" in connection:
                keep_alive = True
            try:
                framing = _framing(status, headers)
            except HttpTransportError:
                conn.close()
                raise
            return Response(self, conn, status, headers, framing, keep_alive)
        raise AssertionError("unreachable")  # pragma: no cover

    def _encode(self, method: str, path: str, body: bytes | None) -> bytes:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(),
            path.encode(),
            self._host_header,
        )
        if body is None:
            return head + b"\r\n"
        return (
            head
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if conn.reusable(now, self._keepalive_s):
                conn.received_any = False
                return conn
            conn.close()
        return None

    async def _connect(self, timeout_s: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to the engine timed out after {timeout_s}s") from None
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return conn

    def give_back(self, conn: _Connection, *, reusable: bool) -> None:
        self._slots.release()
        if reusable and not self._closed and conn.clean():
            conn.idle()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
