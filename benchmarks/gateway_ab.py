"""Did a change make the gateway cheaper? Two builds of the gateway side by side in one
run, against one stub engine.

`--base REF` (a git commit; default HEAD) is exported with `git archive` and run from
there; the candidate is the working tree as it is (`--candidate REF` exports a commit
instead). Both gateways run at once, each its own process on the same CPUs, in front of
the same stub engine (benchmarks/stub_engine.py, answering after `--stub-delay-ms`, as a
model would: the idle time between requests is what leaves the gateway's code cold).

Requests alternate between the two, one at a time, the order flipped every pair (AB BA
...), so machine drift hits both alike; separate runs of one build differ by more than
most changes (on a shared VM the gateway's CPU per cold request moved by 20 % between
back-to-back runs). Reported per mode: each build's e2e (and, for streams, TTFT) p50,
the paired difference candidate - base with a bootstrap 95 % interval of its median, and
each gateway's CPU per request (process CPU clocks over the whole phase).

  python benchmarks/gateway_ab.py --base HEAD --pin 0:1 --out ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_decode import log  # noqa: E402
from benchmarks.gateway_overhead import (  # noqa: E402
    CHAT_PATH,
    MODES,
    Sample,
    affinity,
    client_body,
    engine_server,
    gateway_process,
    median_ci_ms,
    parse_cpu_arg,
    parse_pin,
    process_tree_cpu_s,
    quantiles_ms,
    send,
    tree_affinity,
)

ARMS = ("base", "candidate")
KV_POLICY = {"name": "raas", "budget_tokens": 2048, "alpha": 0.1}


def export_tree(ref: str, into: Path) -> str:
    """Write commit `ref`'s files under `into`; returns the full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit


def working_tree_label() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    return f"{head} + uncommitted changes" if dirty else head


def cpu_model() -> str:
    """The CPU's name, family and model (a VM's name alone can hide its generation)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        name += f", family {fields['cpu family']} model {fields.get('model', '?')}"
    return name


def paired(samples: dict[str, list[Sample]], metric: str) -> dict[str, Any]:
    values = {arm: [getattr(s, metric) for s in samples[arm]] for arm in ARMS}
    diffs = [c - b for b, c in zip(values["base"], values["candidate"], strict=True)]
    return {
        **{arm: quantiles_ms(values[arm]) for arm in ARMS},
        "difference_ms": quantiles_ms(diffs),
        "difference_p50_ci95_ms": median_ci_ms(diffs),
    }


async def ab_mode(
    urls: dict[str, str],
    pids: dict[str, int],
    stream: bool,
    pairs: int,
    warmup: int,
    max_tokens: int,
) -> dict[str, Any]:
    payload = client_body(stream, max_tokens, KV_POLICY)
    samples: dict[str, list[Sample]] = {arm: [] for arm in ARMS}
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        for _ in range(warmup):
            for arm in ARMS:
                await send(client, urls[arm] + CHAT_PATH, payload)
        cpu_before = {arm: process_tree_cpu_s(pids[arm]) for arm in ARMS}
        started = time.perf_counter()
        for i in range(pairs):
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                sample = await send(client, urls[arm] + CHAT_PATH, payload)
                if sample.completion_tokens != max_tokens:
                    got = sample.completion_tokens
                    raise RuntimeError(f"{arm}: {got} completion tokens, not {max_tokens}")
                samples[arm].append(sample)
        wall = time.perf_counter() - started
        cpu = {arm: process_tree_cpu_s(pids[arm]) - cpu_before[arm] for arm in ARMS}
    result: dict[str, Any] = {
        "pairs": pairs,
        "wall_s": round(wall, 2),
        "e2e_ms": paired(samples, "e2e_s"),
        "gateway_cpu_ms_per_request": {arm: 1000 * cpu[arm] / pairs for arm in ARMS},
    }
    result["cpu_ratio_candidate_over_base"] = (
        cpu["candidate"] / cpu["base"] if cpu["base"] > 0 else None
    )
    if stream:
        result["ttft_ms"] = paired(samples, "ttft_s")
    return result


def print_report(result: dict[str, Any]) -> None:
    print(f"\nbase: {result['base']}\ncandidate: {result['candidate']}")
    print(f"{'mode':10} {'metric':6} {'base p50':>9} {'cand p50':>9} {'diff p50':>9}  95% CI")
    for mode, data in result["modes"].items():
        for metric in ("e2e_ms", "ttft_ms"):
            if metric not in data:
                continue
            m = data[metric]
            ci = m["difference_p50_ci95_ms"]
            ci_text = f"{ci[0]:.3f} to {ci[1]:.3f}" if ci else "-"
            print(
                f"{mode:10} {metric[:-3]:6} {m['base']['p50']:9.3f} {m['candidate']['p50']:9.3f}"
                f" {m['difference_ms']['p50']:9.3f}  {ci_text}"
            )
        cpu = data["gateway_cpu_ms_per_request"]
        ratio = data["cpu_ratio_candidate_over_base"]
        print(
            f"{mode:10} cpu ms/request: base {cpu['base']:.3f}, candidate {cpu['candidate']:.3f}"
            + (f" (candidate/base {ratio:.3f})" if ratio else "")
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git commit of the base build")
    parser.add_argument(
        "--candidate", help="git commit of the candidate build (default: the working tree)"
    )
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--warmup-pairs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stub-delay-ms", type=float, default=60.0)
    parser.add_argument(
        "--stub-token-delay-ms",
        type=float,
        default=0.0,
        help="space a stream's token chunks this far apart, as decode steps would",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--pin",
        type=parse_pin,
        metavar="ENGINE:GATEWAY",
        help="CPU lists: the stub on the first, both gateways and the client on the second",
    )
    parser.add_argument(
        "--client-cpus",
        type=parse_cpu_arg,
        metavar="CPUS",
        help="with --pin: run the client on these CPUs instead of the gateways' (the two "
        "builds still share theirs)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.client_cpus is not None and args.pin is None:
        parser.error("--client-cpus needs --pin")
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp:
        workdir = Path(tmp)
        roots = {"base": workdir / "base"}
        labels = {"base": export_tree(args.base, roots["base"])}
        if args.candidate:
            roots["candidate"] = workdir / "candidate"
            labels["candidate"] = export_tree(args.candidate, roots["candidate"])
        else:
            roots["candidate"] = ROOT
            labels["candidate"] = working_tree_label()
        from service.engine.bundled_model import prepare_model

        model_path = prepare_model().path
        engine_cpus, gateway_cpus = args.pin or (None, None)
        result: dict[str, Any] = {
            "benchmark": "gateway_ab",
            "started_utc": started.isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            **labels,
            "environment": {
                "python": platform.python_version(),
                "cpu": cpu_model(),
                "cpu_count": os.cpu_count(),
            },
            "config": {
                "stub_delay_ms": args.stub_delay_ms,
                "stub_token_delay_ms": args.stub_token_delay_ms,
                "max_tokens": args.max_tokens,
                "warmup_pairs": args.warmup_pairs,
                "pinned": args.pin is not None,
                "client_cpus": sorted(args.client_cpus) if args.client_cpus else None,
            },
            "modes": {},
        }
        with contextlib.ExitStack() as stack:
            with affinity(engine_cpus):
                engine = stack.enter_context(
                    engine_server(
                        "stub",
                        "tiny",
                        model_path,
                        workdir,
                        False,
                        args.stub_delay_ms,
                        args.stub_token_delay_ms,
                    )
                )
            urls: dict[str, str] = {}
            pids: dict[str, int] = {}
            with affinity(gateway_cpus):
                for arm in ARMS:
                    url, proc = stack.enter_context(
                        gateway_process(
                            engine.url, engine.model, workdir, None, root=roots[arm], name=arm
                        )
                    )
                    urls[arm], pids[arm] = url, proc.pid
            stack.enter_context(affinity(args.client_cpus or gateway_cpus))
            result["config"]["affinity"] = {
                "engine_tree": tree_affinity(engine.pid),
                **{f"{arm}_tree": tree_affinity(pids[arm]) for arm in ARMS},
                "client": sorted(os.sched_getaffinity(0)),
            }
            for mode in args.modes:
                log(f"{mode}: {args.pairs} pairs")
                result["modes"][mode] = asyncio.run(
                    ab_mode(
                        urls,
                        pids,
                        mode == "stream",
                        args.pairs,
                        args.warmup_pairs,
                        args.max_tokens,
                    )
                )
    print_report(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
