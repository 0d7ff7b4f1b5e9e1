"""Which request is sent when: a seeded plan of prompts and policies, and the two loops.

Closed loop: `concurrency` clients, each sending its next request as soon as its last one
ended. Open loop: Poisson arrivals at `request_rate` (exponential gaps, as in
bench_serving, but from a seeded generator so that a run can be repeated).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.config import LoadConfig


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    prompt_index: int
    policy_index: int


def plan_requests(config: LoadConfig, num_prompts: int) -> list[PlannedRequest]:
    rng = np.random.default_rng(config.seed)
    weights = np.array([choice.weight for choice in config.policies], dtype=float)
    prompts = rng.integers(0, num_prompts, size=config.num_requests)
    policies = rng.choice(len(weights), size=config.num_requests, p=weights / weights.sum())
    return [
        PlannedRequest(i, int(p), int(k))
        for i, (p, k) in enumerate(zip(prompts, policies, strict=True))
    ]


def poisson_arrivals(rate: float, count: int, seed: int) -> np.ndarray:
    """Send times in seconds from the start: the first at 0, then exponential gaps."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(count - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


# Sends one planned request and returns the seconds its client should wait before the
# next one (Retry-After of a 429), 0 otherwise.
SendFn = Callable[[PlannedRequest], Awaitable[float]]


async def closed_loop(
    plan: list[PlannedRequest], concurrency: int, deadline: float, send: SendFn
) -> None:
    queue: Iterator[PlannedRequest] = iter(plan)

    async def client() -> None:
        for request in queue:  # a shared iterator: each request goes to one client
            if time.perf_counter() >= deadline:
                return
            backoff = await send(request)
            if backoff > 0:
                await asyncio.sleep(min(backoff, max(deadline - time.perf_counter(), 0.0)))

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def open_loop(
    plan: list[PlannedRequest],
    arrivals: np.ndarray,
    concurrency: int,
    start: float,
    deadline: float,
    send: SendFn,
) -> None:
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[Any]] = set()

    async def limited(request: PlannedRequest) -> None:
        async with slots:
            if time.perf_counter() < deadline:
                await send(request)

    try:
        for request, at in zip(plan, arrivals, strict=True):
            delay = start + float(at) - time.perf_counter()
            if start + float(at) >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(limited(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))
    finally:
        for task in tasks:
            task.cancel()
