"""The gateway in front of SGLang's router, without engines: stand-ins for the router and
two engines on real sockets, the metrics collector and the stream relay fed the router's
own answers (its worker list, its 404 for /model_info, its `Stream error` event).

The same with real engines and the real router is tests/test_scale_out_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request, Response

from service.engine.client import FRONT_END_PROBE_PATH, EngineClient, Health
from service.server.metrics import GatewayMetrics, parse_engine_metrics
from tests.support.gateway_server import serve_app
from tests.test_stream_relay_unit import Lines, chunk, relay_all


def exposition(running: float, used: float, capacity: float, ranks: int = 1) -> str:
    lines = []
    for family, value in (
        ("sglang:num_running_reqs", running),
        ("sglang:kv_used_tokens", used),
        ("sglang:max_total_num_tokens", capacity),
        ("sglang:token_usage", used / capacity),
    ):
        lines += [f"# HELP {family} x", f"# TYPE {family} gauge"]
        lines += [f'{family}{{dp_rank="{r}"}} {value}' for r in range(ranks)]
    return "\n".join(lines) + "\n"


def test_usage_ratio_of_data_parallel_ranks_is_not_their_sum() -> None:
    parsed = parse_engine_metrics(exposition(1, 600, 1000, ranks=2))
    assert parsed["sglang:kv_used_tokens"] == 1200
    assert parsed["sglang:max_total_num_tokens"] == 2000
    assert parsed["sglang:token_usage"] == pytest.approx(0.6)  # the sum of ratios was 1.2
    ratio_only = "# TYPE sglang:token_usage gauge\n" + "".join(
        f'sglang:token_usage{{dp_rank="{r}"}} {v}\n' for r, v in ((0, 0.2), (1, 0.6))
    )
    assert parse_engine_metrics(ratio_only)["sglang:token_usage"] == pytest.approx(0.4)


def test_replicas_are_exported_each_and_summed() -> None:
    m = GatewayMetrics()
    a, b, c = "http://10.0.0.1:30000", "http://10.0.0.2:30000", "http://10.0.0.3:30000"
    m.engine.update({a: exposition(2, 900, 1000), b: exposition(1, 100, 3000), c: None})

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("raas_engine_up") == 1
    assert [value("raas_engine_replica_up", replica=r) for r in (a, b, c)] == [1, 1, 0]
    assert value("raas_engine_replica_running_requests", replica=a) == 2
    assert value("raas_engine_replica_kv_usage_ratio", replica=b) == pytest.approx(100 / 3000)
    assert value("raas_engine_running_requests") == 3
    assert value("raas_engine_kv_capacity_tokens") == 4000
    # Used over capacity of the sums: 1000/4000, not 0.9 + 0.033.
    assert value("raas_engine_kv_usage_ratio") == pytest.approx(0.25)
    m.engine.update({a: None, b: None})
    assert value("raas_engine_up") == 0
    assert value("raas_engine_replica_up", replica=a) == 0
    # One engine without a router: no replica series.
    m.engine.update(exposition(1, 10, 100))
    assert value("raas_engine_replica_up", replica=a) is None
    assert value("raas_engine_kv_usage_ratio") == pytest.approx(0.1)


def test_the_routers_stream_error_is_the_engine_lost_mid_stream() -> None:
    cut = {"error": {"message": "Stream error: error decoding response body: unexpected EOF"}}
    upstream = Lines(
        [b"data: " + chunk("a"), b"data: " + json.dumps(cut).encode(), b"data: [DONE]"]
    )
    events, relay = relay_all(upstream)
    error = json.loads(events[1].removesuffix(b"data: [DONE]\n\n").removeprefix(b"data: "))
    assert error["error"]["code"] == "engine_unavailable"
    assert error["error"]["type"] == "server_error"
    assert "decoding" not in error["error"]["message"]
    assert events[-1].endswith(b"data: [DONE]\n\n")
    assert relay.result.outcome == "engine_unavailable"


@dataclass
class StandIn:
    """A stand-in engine: records the rids it was asked to abort."""

    aborted: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/abort_request")
        async def abort(request: Request) -> Response:
            self.aborted.append((await request.json())["rid"])
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(exposition(1, 10, 100), media_type="text/plain")

        return app


def router_app(workers: list[str], ready: list[bool]) -> FastAPI:
    """What smg answers itself: its workers, its readiness, 404 for /model_info."""
    app = FastAPI()

    @app.get("/workers")
    async def listed() -> dict:
        return {"workers": [{"url": url, "is_healthy": True} for url in workers]}

    @app.get("/readiness")
    async def readiness() -> Response:
        return Response(status_code=200 if ready[0] else 503)

    @app.get("/get_model_info")
    async def model_info() -> dict:
        return {"served_model_name": "tiny", "reasoning_parser": None}

    return app


@pytest.fixture
def fleet() -> Iterator[tuple[str, list[str], list[StandIn], list[bool]]]:
    engines = [StandIn(), StandIn()]
    ready = [True]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_app(e.app())) for e in engines]
        router = stack.enter_context(serve_app(router_app(urls, ready)))
        yield router, urls, engines, ready


def client(url: str) -> EngineClient:
    return EngineClient(url, connect_timeout_s=2, read_timeout_s=5, max_connections=8)


def test_behind_a_router_aborts_reach_every_engine_and_metrics_each(fleet) -> None:
    router, urls, engines, ready = fleet

    async def run() -> None:
        c = client(router)
        try:
            assert await c.replicas() == urls
            assert await c.abort("chatcmpl-1")
            assert [e.aborted for e in engines] == [["chatcmpl-1"], ["chatcmpl-1"]]
            texts = await c.replica_metrics()
            assert isinstance(texts, dict) and list(texts) == urls and all(texts.values())
            # /model_info is 404 at the router: readiness is the router's own, and the
            # model's info comes through the path it forwards.
            assert await c.probe(2, FRONT_END_PROBE_PATH) is Health.OK
            ready[0] = False
            assert await c.probe(2, FRONT_END_PROBE_PATH) is Health.DOWN
            assert (await c.model_info() or {}).get("served_model_name") == "tiny"
        finally:
            await c.aclose()

    asyncio.run(run())


def test_a_plain_engine_is_aborted_directly() -> None:
    engine = StandIn()
    with serve_app(engine.app()) as url:

        async def run() -> None:
            c = client(url)
            try:
                assert await c.replicas() == []
                assert await c.abort("chatcmpl-2")
                assert isinstance(await c.replica_metrics(), str)
            finally:
                await c.aclose()

        asyncio.run(run())
    assert engine.aborted == ["chatcmpl-2"]
