"""Send every (problem, policy point) to the endpoint through the `openai` client.

Retries are the client's own: it retries 408/409/429/5xx and connection errors with
exponential backoff and waits what `Retry-After` (or `retry-after-ms`) asks when that is
at most a minute, which covers the gateway's 429 (admission) and 503 (engine restarting).
A request that still fails is recorded as an error for that problem and the run goes on.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import openai

from eval.accuracy.answers import check_answer, extract_answer
from eval.accuracy.policy_grid import PolicyPoint
from eval.accuracy.problems import Problem
from eval.accuracy.records import RecordWriter, Signature, record_key

DEFAULT_PROMPT = (
    "{question}\n\nSolve the problem step by step, then give the final answer as \\boxed{{answer}}."
)


@dataclass(frozen=True)
class RunConfig:
    signature: Signature
    concurrency: int = 4
    send_seed: bool = False
    rel_tol: float = 1e-6
    progress: bool = True
    # Past this (time.monotonic()), no new request is sent; those in flight finish.
    deadline: float | None = None


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...
    def close(self) -> object: ...


class _Counter:
    """Progress on stderr without tqdm: one line per tenth of the work."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total and self.done * 10 // self.total != (self.done - n) * 10 // self.total:
            print(f"raas-eval: {self.done}/{self.total} requests", file=sys.stderr)

    def close(self) -> None:
        pass


def make_progress(total: int, enabled: bool) -> Progress:
    if not enabled:
        return _Counter(0)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, unit="req", desc="raas-eval", dynamic_ncols=True)


def select_problems(problems: Sequence[Problem], limit: int | None, seed: int) -> list[Problem]:
    """A seeded sample of `limit` problems, kept in file order (same seed, same subset)."""
    if limit is None or limit >= len(problems):
        return list(problems)
    chosen = set(random.Random(seed).sample(range(len(problems)), limit))
    return [p for i, p in enumerate(problems) if i in chosen]


def grade(text: str, reference: str, rel_tol: float) -> dict[str, Any]:
    extracted = extract_answer(text)
    if extracted is None:
        return {"extracted": None, "extraction": None, "correct": False, "check": None}
    verdict = check_answer(extracted.text, reference, rel_tol=rel_tol)
    return {
        "extracted": extracted.text,
        "extraction": extracted.method,
        "correct": verdict.correct,
        "check": verdict.method,
    }


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return {
            "status": exc.status_code,
            "code": body.get("code") or getattr(exc, "code", None),
            "message": str(body.get("message") or exc.message)[:500],
        }
    return {"status": None, "code": type(exc).__name__, "message": str(exc)[:500]}


async def _ask(
    client: openai.AsyncOpenAI, problem: Problem, point: PolicyPoint, config: RunConfig
) -> dict[str, Any]:
    sig = config.signature
    record: dict[str, Any] = {
        "problem_id": problem.id,
        "label": point.label,
        "policy": point.name,
        "budget_tokens": point.budget_tokens,
        "kv_policy": point.kv_policy(),
        "reference": problem.answer,
        "signature": sig.as_dict(),
    }
    extra_body: dict[str, Any] = {}
    if point.kv_policy() is not None:
        extra_body["kv_policy"] = point.kv_policy()
    optional: dict[str, Any] = {}
    if config.send_seed and sig.seed is not None:
        optional["seed"] = sig.seed
    start = time.monotonic()
    try:
        resp = await client.chat.completions.create(
            model=sig.model,
            messages=[
                {"role": "user", "content": sig.prompt_template.format(question=problem.question)}
            ],
            max_tokens=sig.max_tokens,
            temperature=sig.temperature,
            top_p=sig.top_p,
            extra_body=extra_body or None,
            **optional,
        )
    except openai.APIError as exc:  # status, connection, timeout, unreadable response
        record.update(status="error", error=_error(exc), latency_s=time.monotonic() - start)
        return record
    record["latency_s"] = time.monotonic() - start
    dumped = resp.model_dump()
    usage = dumped.get("usage") or {}
    choice = (dumped.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    record.update(
        status="ok",
        text=text,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        kv_cache=usage.get("kv_cache"),
        **grade(text, problem.answer, config.rel_tol),
    )
    return record


async def run_grid(
    client: openai.AsyncOpenAI,
    problems: Iterable[Problem],
    grid: Sequence[PolicyPoint],
    config: RunConfig,
    writer: RecordWriter,
    done: set[str],
) -> list[dict[str, Any]]:
    """Run what is not in `done` (record keys), problem by problem so that an interrupted
    run leaves complete pairs; return the new records in completion order."""
    todo = [
        (p, point) for p in problems for point in grid if record_key(p.id, point.label) not in done
    ]
    gate = asyncio.Semaphore(config.concurrency)

    async def bounded(problem: Problem, point: PolicyPoint) -> dict[str, Any] | None:
        async with gate:
            if config.deadline is not None and time.monotonic() > config.deadline:
                return None  # not sent: a rerun of the same command picks it up
            return await _ask(client, problem, point, config)

    progress = make_progress(len(todo), config.progress)
    new: list[dict[str, Any]] = []
    try:
        for finished in asyncio.as_completed([bounded(p, pt) for p, pt in todo]):
            record = await finished
            progress.update(1)
            if record is not None:
                writer.write(record)
                new.append(record)
    finally:
        progress.close()
    return new
