"""Scale-out: the gateway in front of SGLang's router (`smg`) and two real engines.

Two tiny CPU engines (random weights, raas backend) behind `smg launch --policy least_load`,
the gateway in remote mode with the router's URL as its engine, in order:

- spread: a mixed load (streamed and not, per-request kv_policy) reaches both engines,
  every answer carries `usage.kv_cache` with the policy asked for, and the gateway's
  /metrics shows both replicas and their sum;
- failover: with long streams running on both, one engine is killed outright (SIGKILL to
  its process group). Exactly the streams that engine held end with the documented
  `engine_unavailable` error event and `[DONE]`; the others finish, and new requests sent
  while the router notices all succeed on the survivor; the gateway stays ready;
- rejoin: the engine starts again on its port, the router marks it healthy, and new
  traffic reaches it again.

The figures go to stdout (`pytest -s`) and into docs/reliability.md ("Scale-out").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.server.settings import Settings
from tests.support.gateway_server import serve_app, wait_ready
from tests.support.metrics_text import gateway_metric
from tests.support.scale_out import EngineReplica, RunningRouter, engine_replicas, smg_router

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

MODEL = "tiny"
POLICY = {"name": "raas", "budget_tokens": 32}
LONG_STREAMS = 6
LONG_TOKENS = 400


@dataclass
class Fleet:
    gateway: str
    router: RunningRouter
    engines: list[EngineReplica]


@pytest.fixture(scope="module")
def fleet(bundled_model_path, tmp_path_factory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("scale-out")
    with contextlib.ExitStack() as stack:
        engines = stack.enter_context(engine_replicas(Path(bundled_model_path), workdir, 2, MODEL))
        router = stack.enter_context(smg_router([e.url for e in engines]))
        config = Settings(
            engine_mode="remote",
            engine_url=router.url,
            model_name=MODEL,
            model_path=str(workdir),
            engine_health_interval_s=0.5,
            api_keys=None,
            api_keys_file=None,
        )
        url = stack.enter_context(serve_app(create_app(config)))
        wait_ready(url, timeout_s=60)
        yield Fleet(url, router, engines)


def body(i: int, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Question {i}: count to ten."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "kv_policy": POLICY,
    }


@dataclass
class Outcome:
    status: int
    finished: bool  # a finish_reason arrived
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    done: bool  # a stream's `data: [DONE]`


async def chat(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Outcome:
    payload = {k: v for k, v in payload.items() if v is not None}
    if not payload["stream"]:
        resp = await client.post(f"{url}/v1/chat/completions", json=payload)
        data = resp.json()
        finished = bool(data.get("choices")) and data["choices"][0].get("finish_reason")
        return Outcome(resp.status_code, bool(finished), data.get("error"), data.get("usage"), True)
    out = Outcome(0, False, None, None, False)
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as resp:
        out.status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                continue
            chunk = json.loads(line[6:])
            out.error = chunk.get("error", out.error)
            out.usage = chunk.get("usage") or out.usage
            if any(c.get("finish_reason") for c in chunk.get("choices") or ()):
                out.finished = True
    return out


async def load(url: str, n: int, concurrency: int, max_tokens: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> Outcome:
        async with gate:
            return await chat(client, url, body(i, stream=i % 2 == 0, max_tokens=max_tokens))

    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def engine_gauge(engine: EngineReplica, name: str) -> float:
    text = httpx.get(f"{engine.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def assert_all_served(outcomes: list[Outcome]) -> None:
    for out in outcomes:
        assert out.status == 200 and out.finished and out.done and out.error is None, out
        assert out.usage and out.usage["kv_cache"]["policy"] == "raas", out.usage
        assert out.usage["kv_cache"]["budget_tokens"] == POLICY["budget_tokens"]


def test_load_spreads_over_both_replicas(fleet: Fleet) -> None:
    before = [e.chat_posts() for e in fleet.engines]
    started = time.monotonic()
    outcomes = asyncio.run(load(fleet.gateway, 16, 4, 16))
    elapsed = time.monotonic() - started
    assert_all_served(outcomes)
    shares = [e.chat_posts() - b for e, b in zip(fleet.engines, before, strict=True)]
    print(f"\nspread: 16 requests in {elapsed:.1f} s, per engine {shares}")
    assert sum(shares) == 16 and min(shares) >= 2, shares
    # Per replica and summed: the KV capacity of two 4096-token pools is 8192, and the
    # usage ratio is a ratio of the sums (at most 1), not a sum of ratios.
    assert gateway_metric(fleet.gateway, "raas_engine_up") == 1
    for engine in fleet.engines:
        assert gateway_metric(fleet.gateway, "raas_engine_replica_up", replica=engine.url) == 1
    assert gateway_metric(fleet.gateway, "raas_engine_kv_capacity_tokens") == 8192
    assert 0 <= gateway_metric(fleet.gateway, "raas_engine_kv_usage_ratio") <= 1


def test_killed_replica_fails_only_its_own_streams_and_rejoins(fleet: Fleet) -> None:
    survivor, victim = fleet.engines

    async def scenario() -> tuple[list[Outcome], list[Outcome], int, float]:
        async with httpx.AsyncClient(timeout=180) as client:
            long_streams = [
                asyncio.create_task(
                    chat(client, fleet.gateway, body(100 + i, stream=True, max_tokens=LONG_TOKENS))
                )
                for i in range(LONG_STREAMS)
            ]
            # Every long stream decoding, on both engines.
            deadline = time.monotonic() + 60
            while True:
                running = [engine_gauge(e, "sglang:num_running_reqs") for e in fleet.engines]
                if sum(running) == LONG_STREAMS and min(running) > 0:
                    break
                assert time.monotonic() < deadline, f"streams not running on both: {running}"
                await asyncio.sleep(0.2)
            held = int(running[1])
            killed_at = time.monotonic()
            victim.kill()
            # Traffic while the router notices, and after.
            during = await load(fleet.gateway, 12, 3, 8)
            return await asyncio.gather(*long_streams), during, held, killed_at

    long_outcomes, during, held, killed_at = asyncio.run(scenario())
    cut = [o for o in long_outcomes if o.error is not None]
    print(
        f"\nfailover: {LONG_STREAMS} long streams, {held} on the killed engine; "
        f"{len(cut)} ended with an error event, {LONG_STREAMS - len(cut)} finished; "
        f"{sum(o.status == 200 and o.error is None for o in during)}/{len(during)} "
        "requests sent after the kill served"
    )
    assert len(cut) == held
    for out in cut:
        assert out.status == 200 and out.done and not out.finished, out
        assert out.error["code"] == "engine_unavailable", out.error
        assert out.error["type"] == "server_error"
    for out in long_outcomes:
        if out.error is None:
            assert out.finished and out.done, out
    assert_all_served(during)
    fleet.router.wait_workers({survivor.url: True, victim.url: False}, timeout_s=10)
    assert httpx.get(f"{fleet.gateway}/health/ready", timeout=5).status_code == 200

    victim.start()
    victim.wait_healthy()
    rejoined = fleet.router.wait_workers({survivor.url: True, victim.url: True}, timeout_s=30)
    print(
        f"rejoin: killed engine back in the router {time.monotonic() - killed_at:.0f} s after "
        f"the kill ({rejoined:.1f} s after its own start-up)"
    )
    before = victim.chat_posts()
    outcomes = asyncio.run(load(fleet.gateway, 12, 4, 8))
    assert_all_served(outcomes)
    assert victim.chat_posts() - before >= 2, victim.chat_posts() - before
