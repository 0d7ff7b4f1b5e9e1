"""Run a load test: plan, send on the chosen loop, stop at the bounds, collect records."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from loadtest.client import RequestRecord, chat_body, stream_chat
from loadtest.config import LoadConfig
from loadtest.progress import NoProgress, ProgressSink
from loadtest.prompts import load_prompt_set
from loadtest.schedule import (
    PlannedRequest,
    closed_loop,
    open_loop,
    plan_requests,
    poisson_arrivals,
)


@dataclass
class RunResult:
    config: LoadConfig
    started_at: str
    duration_s: float
    records: list[RequestRecord] = field(default_factory=list)


async def run_load(config: LoadConfig, progress: ProgressSink | None = None) -> RunResult:
    """Drive the target with `config` and return every request's record.

    No request is sent after `duration_s` or beyond `num_requests`; requests still in
    flight `drain_timeout_s` after the duration are cancelled and recorded as such.
    """
    sink = progress or NoProgress()
    prompts = load_prompt_set(config.prompt_set)
    plan = plan_requests(config, len(prompts.prompts))
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    records: list[RequestRecord] = []
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    # A fresh connection per request, as bench_serving does (a session per request): a
    # pooled keep-alive connection that the server closes just as it is reused would fail
    # a request that the server never saw.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + config.duration_s

        async def send(request: PlannedRequest) -> float:
            choice = config.policies[request.policy_index]
            body = chat_body(
                config.model,
                prompts.messages(request.prompt_index),
                config.max_tokens,
                config.temperature,
                choice.kv_policy,
                config.ignore_eos,
            )
            record = RequestRecord(index=request.index, policy=choice.label)
            records.append(record)
            try:
                await stream_chat(http, config.chat_url, body, headers, record, start)
            finally:
                sink.request_done(record)
            if config.honor_retry_after and record.retry_after_s:
                return record.retry_after_s
            return 0.0

        # LoadConfig guarantees a request rate in open mode.
        if config.mode == "open" and config.request_rate is not None:
            arrivals = poisson_arrivals(config.request_rate, len(plan), config.seed)
            driver = open_loop(plan, arrivals, config.concurrency, start, deadline, send)
        else:
            driver = closed_loop(plan, config.concurrency, deadline, send)
        task = asyncio.create_task(driver)
        limit = deadline + config.drain_timeout_s
        while not task.done() and time.perf_counter() < limit:
            await asyncio.wait({task}, timeout=min(0.5, max(limit - time.perf_counter(), 0)))
            sink.tick()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        duration = time.perf_counter() - start
    records.sort(key=lambda r: r.index)
    return RunResult(config=config, started_at=started_at, duration_s=duration, records=records)
