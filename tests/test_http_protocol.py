"""The gateway's HTTP server against slow and old clients, over raw sockets.

The gateway runs with the protocol `raas-serve serve` uses (service/server/http_protocol.py), in
front of the scripted stand-in engine of test_gateway_contract. A client that connects
and sends nothing, sends half a head, or promises a longer body than it sends must be
answered 408 and closed within its deadline, not held open forever. A streamed reply to
an HTTP/1.0 client must not be chunked (1.0 has no chunked coding): its body is the raw
event stream, ended by closing the connection.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from service.app import create_app
from service.server.http_protocol import protocol_factory
from service.server.settings import Settings
from tests.support.gateway_server import serve_app, wait_ready
from tests.test_gateway_contract import MODEL, FakeEngine

HEADER_S, BODY_S = 1.0, 1.5
# How long a test waits for the server's answer before calling it "held open".
PATIENCE_S = 10.0


@pytest.fixture(scope="module")
def gw() -> Iterator[str]:
    fake = FakeEngine()
    with serve_app(fake.app) as engine_url:
        settings = Settings(
            engine_mode="remote",
            engine_url=engine_url,
            engine_health_interval_s=0.1,
            http_header_timeout_s=HEADER_S,
            http_body_timeout_s=BODY_S,
        )
        app = create_app(settings)
        with serve_app(app, http=protocol_factory(HEADER_S, BODY_S)) as url:
            wait_ready(url, timeout_s=10)
            yield url


def connect(url: str) -> socket.socket:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port), timeout=PATIENCE_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes; raises TimeoutError if it never does."""
    started = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, silent (a half-open connection)
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",  # half a head
    ],
    ids=["silent", "half-head"],
)
def test_a_slow_head_gets_408_and_is_closed(gw, sent):
    with connect(gw) as sock:
        sock.sendall(sent)
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"code":"request_timeout"' in data
    assert waited < HEADER_S + 3


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(gw):
    body = b'{"model": "m", "messages": []}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body) + 100)
    )
    with connect(gw) as sock:
        sock.sendall(head + body)
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert waited < BODY_S + 3


def test_a_slow_client_does_not_hold_a_healthy_one_up(gw):
    with connect(gw) as idle:
        assert httpx.get(f"{gw}/health/live", timeout=5).status_code == 200
        idle.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data = idle.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_stream_to_an_http_1_0_client_is_not_chunked(gw):
    body = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
        % MODEL.encode()
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    with connect(gw) as sock:
        sock.sendall(request)
        data, _ = read_until_closed(sock)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    headers = head.lower()
    assert b"transfer-encoding" not in headers, head
    assert b"connection: close" in headers
    assert payload.startswith(b"data: {"), payload[:80]
    assert payload.endswith(b"data: [DONE]\n\n"), payload[-80:]
