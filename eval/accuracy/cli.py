"""`raas-eval`: a problem set x a grid of KV policies and budgets, against an OpenAI-compatible
endpoint; writes records.jsonl (resumable), results.json and accuracy_vs_kv.png to --out.

    raas-eval --problems eval/data/accuracy/arithmetic.jsonl \\
        --policies dense raas streaming --budgets 32 64 --max-tokens 160 --out build/eval
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

from eval.accuracy.local_gateway import gateway_for
from eval.accuracy.plot import plot_accuracy_vs_kv
from eval.accuracy.policy_grid import KNOWN_POLICIES, build_grid
from eval.accuracy.problems import LAYOUTS, load_problems
from eval.accuracy.records import (
    RecordWriter,
    Signature,
    SignatureMismatch,
    check_signature,
    read_records,
)
from eval.accuracy.runner import DEFAULT_PROMPT, RunConfig, run_grid, select_problems
from eval.accuracy.summary import complete_problems, markdown_table, summarize

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raas-eval",
        description="Task accuracy and KV memory saved per KV policy and budget, through an "
        "OpenAI-compatible chat endpoint (docs/fidelity.md, 'Task accuracy').",
    )
    p.add_argument("--problems", type=Path, required=True, help="JSONL problem file")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="field layout of the file")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL)
    p.add_argument(
        "--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY or none)"
    )
    p.add_argument("--model", default=None, help="model id (default: the endpoint's first model)")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["dense", "raas", "streaming"],
        choices=KNOWN_POLICIES,
        help="'none' sends no kv_policy (an endpoint without the extension)",
    )
    p.add_argument("--budgets", nargs="*", type=int, default=[32, 64], help="budget_tokens values")
    p.add_argument(
        "--kv-param",
        action="append",
        default=[],
        metavar="POLICY.FIELD=VALUE",
        help="an extra kv_policy field for one policy, e.g. raas.alpha=0.1 (repeatable)",
    )
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--prompt-template", default=DEFAULT_PROMPT, help="user message; {question} is replaced"
    )
    p.add_argument("--limit", type=int, default=None, help="a seeded sample of this many problems")
    p.add_argument("--seed", type=int, default=0, help="picks the --limit sample")
    p.add_argument(
        "--send-seed",
        action="store_true",
        help="also send the seed with each request (our gateway refuses seeds: temperature 0 "
        "is its repeatable mode)",
    )
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-retries", type=int, default=6, help="per request, 429/5xx/connection")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--time-limit-min",
        type=float,
        default=None,
        help="send no new request after this many minutes; the summary covers the problems "
        "every policy point answered, and rerunning the command continues",
    )
    p.add_argument("--rel-tol", type=float, default=1e-6, help="numeric answer tolerance")
    p.add_argument("--out", type=Path, default=Path("build/eval"))
    p.add_argument("--overwrite", action="store_true", help="discard earlier records in --out")
    p.add_argument(
        "--start-gateway",
        action="store_true",
        help="if nothing answers at a loopback --base-url, start raas-serve there for the run",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def _kv_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        policy, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"expected POLICY.FIELD=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word such as max or mean
        out.setdefault(policy, {})[name] = value
    return out


def _first_model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    if not models:
        raise RuntimeError("the endpoint lists no models; pass --model")
    return models[0].id


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    problem_set = load_problems(args.problems, args.layout)
    for issue in problem_set.issues:
        print(
            f"raas-eval: {args.problems}:{issue.line} ({issue.id}): {issue.reason}", file=sys.stderr
        )
    problems = select_problems(problem_set.problems, args.limit, args.seed)
    grid = build_grid(args.policies, args.budgets, _kv_params(args.kv_param))
    api_key = (
        args.api_key or "none"
    )  # the openai client insists on a key; ours ignores it when auth is off
    if args.model:
        model = args.model
    else:
        with openai.OpenAI(
            base_url=args.base_url, api_key=api_key, max_retries=args.max_retries
        ) as sync_client:
            model = _first_model(sync_client)
    signature = Signature(
        model=model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        prompt_template=args.prompt_template,
        problems_sha256=problem_set.sha256,
        seed=args.seed,
    )
    records_path = args.out / "records.jsonl"
    if args.overwrite and records_path.exists():
        records_path.unlink()
    previous, unreadable = read_records(records_path)
    if unreadable:
        print(
            f"raas-eval: {unreadable} unreadable line(s) in {records_path}: redone", file=sys.stderr
        )
    check_signature(previous, signature)
    done = {k for k, r in previous.items() if r.get("status") == "ok"}
    config = RunConfig(
        signature=signature,
        concurrency=args.concurrency,
        send_seed=args.send_seed,
        rel_tol=args.rel_tol,
        progress=not args.no_progress,
        deadline=None
        if args.time_limit_min is None
        else time.monotonic() + 60 * args.time_limit_min,
    )

    async def send() -> list[dict[str, Any]]:
        async with openai.AsyncOpenAI(
            base_url=args.base_url,
            api_key=api_key,
            max_retries=args.max_retries,
            timeout=args.request_timeout,
        ) as client:
            return await run_grid(client, problems, grid, config, writer, done)

    writer = RecordWriter(records_path)
    start = time.monotonic()
    try:
        new = asyncio.run(send())
    finally:
        writer.close()
    elapsed = time.monotonic() - start
    latest, _ = read_records(records_path)
    complete = complete_problems(grid, latest.values(), [p.id for p in problems])
    rows = summarize(grid, latest.values(), complete)
    results = {
        "command": " ".join(["raas-eval", *argv]),
        "base_url": args.base_url,
        "signature": signature.as_dict(),
        "problem_set": {
            "path": str(args.problems),
            "sha256": problem_set.sha256,
            "loaded": len(problem_set.problems),
            "used": len(problems),
            # Fewer than used when the time limit stopped the run early.
            "complete": len(complete),
            "issues": [issue.__dict__ for issue in problem_set.issues],
        },
        "grid": [point.label for point in grid],
        "requests_this_run": len(new),
        "wall_time_s": round(elapsed, 1),
        "results": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = f"{model}: {len(complete)} problems of {args.problems.name}"
    plot_accuracy_vs_kv(rows, args.out / "accuracy_vs_kv.png", title)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.start_gateway:
            with gateway_for(args.base_url, args.out / "gateway.log"):
                results = run(args, argv)
        else:
            results = run(args, argv)
    except (ValueError, SignatureMismatch, RuntimeError, TimeoutError, OSError) as exc:
        print(f"raas-eval: {exc}", file=sys.stderr)
        return 2
    except openai.APIConnectionError as exc:
        print(f"raas-eval: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(results["results"]))
    problem_set = results["problem_set"]
    if problem_set["complete"] < problem_set["used"]:
        print(
            f"\nstopped by --time-limit-min: {problem_set['complete']} of {problem_set['used']} "
            "problems complete; rerun the same command to continue"
        )
    print(f"\nresults: {args.out / 'results.json'}, plot: {args.out / 'accuracy_vs_kv.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
