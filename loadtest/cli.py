"""`raas-loadtest` / `python -m loadtest`: flags (or a JSON config file) -> LoadConfig -> run
-> table on stdout, JSON and PNG in --output-dir."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from loadtest.config import LoadConfig, PolicyChoice
from loadtest.progress import NoProgress, RichProgress
from loadtest.prompts import BUILTIN_SETS
from loadtest.report import Report, render_table, write_json, write_png
from loadtest.runner import run_load

# Flags whose value goes straight into a LoadConfig field of the same name.
FIELD_FLAGS = (
    "base_url",
    "model",
    "api_key",
    "mode",
    "concurrency",
    "request_rate",
    "num_requests",
    "duration_s",
    "drain_timeout_s",
    "request_timeout_s",
    "prompt_set",
    "max_tokens",
    "temperature",
    "seed",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raas-loadtest",
        description="Load an OpenAI-compatible chat endpoint with streaming requests and "
        "report TTFT, TPOT, ITL, latency, throughput, goodput and server-reported KV savings.",
    )
    p.add_argument("--config", type=Path, help="JSON file of run settings; flags override it")
    p.add_argument("--base-url", help="server root (default http://127.0.0.1:8000)")
    p.add_argument("--model", help="model id to send")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a target that is not loopback"
    )
    p.add_argument(
        "--mode", choices=("closed", "open"), help="closed-loop clients or open-loop arrivals"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        help="closed loop: number of clients; open loop: cap on outstanding requests",
    )
    p.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, help="send at most this many requests")
    p.add_argument(
        "--duration", dest="duration_s", type=float, help="send for at most this many seconds"
    )
    p.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        help="after the duration, wait this long for requests in flight, then cancel them",
    )
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float)
    p.add_argument(
        "--no-retry-after",
        action="store_true",
        help="closed loop: send the next request at once after a 429",
    )
    p.add_argument("--prompt-set", help=f"{' or '.join(BUILTIN_SETS)}, or a JSON file of prompts")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument(
        "--policy",
        action="append",
        metavar="SPEC[@WEIGHT]",
        help="kv_policy mix entry, repeatable: 'default' (no kv_policy), 'dense', "
        "'raas,budget_tokens=256,alpha=0.1@3'",
    )
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT objective")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT objective")
    p.add_argument("--slo-e2el-ms", type=float, help="goodput: end-to-end objective")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir", type=Path, help="write loadtest.json and loadtest.png here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    data: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    for name in FIELD_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.allow_remote:
        data["allow_remote"] = True
    if args.no_retry_after:
        data["honor_retry_after"] = False
    if args.ignore_eos:
        data["ignore_eos"] = True
    if args.policy:
        data["policies"] = [PolicyChoice.parse(spec).model_dump() for spec in args.policy]
    slo = dict(data.get("slo") or {})
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        value = getattr(args, f"slo_{key}")
        if value is not None:
            slo[key] = value
    data["slo"] = slo
    return LoadConfig.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Rich falls back to 80 columns when stdout is not a terminal: too narrow for the table.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"raas-loadtest: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.no_progress:
        result = asyncio.run(run_load(config, NoProgress()))
    else:
        with RichProgress(config.num_requests, config.duration_s, console) as progress:
            result = asyncio.run(run_load(config, progress))
    report = Report.build(result)
    render_table(report, console)
    if args.output_dir is not None:
        json_path = write_json(report, args.output_dir / "loadtest.json")
        png_path = write_png(report, args.output_dir / "loadtest.png")
        console.print(f"wrote {json_path} and {png_path}")
    return 0
