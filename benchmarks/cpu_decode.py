"""Decode tokens/s on the CPU through the real SGLang engine: dense vs raas, side by side.

One engine (`--attention-backend raas`) serves every arm; the per-request policy comes
from `custom_params.kv_policy`, so dense and raas run on the same process, weights and
allocator, one after the other:

- ``dense``: `kv_policy.name = dense` (the raas backend attending over everything);
- ``raas_nobudget``: raas with a budget larger than the generation: the budget is never
  reached, so this is the raas bookkeeping overhead against dense over the same window;
- ``raas_<B>``: raas with `budget_tokens = B` (default 512 and 1024).

Optionally a second engine with stock SGLang `torch_native` (dense) runs the same
generations, for the overhead question against SGLang itself (``--torch-native``).

Each arm is one long greedy generation (`ignore_eos`) per request, streamed from
`/generate`; with concurrency C, C identical requests run at once. The tokens/s at
checkpoint L is instantaneous: tokens [L - window, L) divided by the time they took
(per request from its own stream, summed over the C requests for the aggregate).

With ``--repeats N`` every arm runs N times, the order of the arms reversed on every
other repeat (dense, raas, raas, dense for two arms and two repeats): the speed of a
shared VM drifts by tens of percent over minutes, and one sequential pass charges that
drift to whichever arm ran in the slow minutes. A checkpoint's figure is then the
geometric mean over the repeats, and each repeat's own raas/dense ratio is kept beside
it (the arms of one repeat ran next to each other).

Prints a table with raas/dense ratios per checkpoint and the overhead below budget, and
writes everything to the JSON file given by --out.

"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.sglang_server import (  # noqa: E402
    RunningServer,
    descendants,
    sglang_server,
    tree_cpu_s,
    tree_jiffies,
)

STANDARD_CHECKPOINTS = (512, 1024, 2048, 4096, 8192)
DEFAULT_PROMPT = (
    "Solve step by step, showing all of your reasoning: a train leaves a station at 9:00 "
    "travelling at 80 km/h, and a second train leaves the same station at 10:30 travelling "
    "at 120 km/h on the same track. When and where does the second train catch the first?"
)
PAGE_SIZE = 16
QUIET_SAMPLE_S = 5.0
SMOKE_USAGE = """smoke run (about a minute):
  python benchmarks/cpu_decode.py --max-len 96 --window 16 --budgets 32 \\
      --concurrency 1 2 --out cpu_decode_smoke.json"""
KV_USED_METRIC = "sglang:kv_used_tokens"


@dataclass(frozen=True)
class Arm:
    """One measured configuration: an engine backend and a per-request kv_policy."""

    name: str
    engine: str  # "raas" or "torch_native"
    policy: str | None  # kv_policy.name, None for the stock engine
    budget_tokens: int | None = None

    def custom_params(self) -> dict[str, Any] | None:
        if self.policy is None:
            return None
        kv: dict[str, Any] = {"name": self.policy}
        if self.budget_tokens is not None:
            kv["budget_tokens"] = self.budget_tokens
        return {"kv_policy": kv}


@dataclass
class StreamTrace:
    """Arrival time of each completion-token count in one request's stream."""

    prompt_tokens: int = 0
    #: times[n - 1] = perf_counter() when the stream first reported >= n tokens.
    times: list[float] = field(default_factory=list)

    def record(self, completion_tokens: int, now: float) -> None:
        while len(self.times) < completion_tokens:
            self.times.append(now)

    def rate(self, lo: int, hi: int) -> float:
        """Tokens/s over tokens (lo, hi]: (hi - lo) tokens after token lo arrived."""
        elapsed = self.times[hi - 1] - self.times[lo - 1]
        return (hi - lo) / elapsed if elapsed > 0 else math.inf


@dataclass
class CheckpointResult:
    tok_s: float  # aggregate over the concurrent requests
    per_request_tok_s: float  # mean of the requests' own rates
    #: SGLang's kv_used_tokens gauge (all requests), sampled when the first request
    #: reached L - window / 2; SGLang refreshes it every 40 decode steps.
    kv_used_tokens: float | None
    #: Average cores kept busy by other processes on the machine during the window.
    foreign_cpu_cores: float | None
    #: Tokens (all requests) per CPU-second of the engine's processes over the window:
    #: the cost per token, robust to other load on a shared machine where tok/s is not.
    tok_per_engine_cpu_s: float | None = None


@dataclass
class RunResult:
    arm: str
    engine: str
    policy: str | None
    budget_tokens: int | None
    concurrency: int
    max_len: int
    prompt_tokens: int
    wall_s: float
    mean_tok_s: float  # aggregate over the whole generation, prefill included
    checkpoints: dict[str, CheckpointResult]
    #: Average cores kept busy by other processes on the machine during the run.
    foreign_cpu_cores: float = 0.0
    #: Which pass over the arms this run belongs to (--repeats), from 0.
    repeat: int = 0


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat.

    Busy includes steal (time the hypervisor gave to other guests); guest time is already
    inside user time, so only the first eight columns count.
    """
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class ForeignCpu:
    """CPU taken from the engine by anything else: other processes, hypervisor steal."""

    engine_pid: int
    busy0: int = 0
    total0: int = 0
    ours0: int = 0

    def ours(self) -> int:
        pids = descendants(self.engine_pid) | {self.engine_pid, os.getpid()}
        return tree_jiffies(pids)

    def start(self) -> ForeignCpu:
        self.busy0, self.total0 = cpu_jiffies()
        self.ours0 = self.ours()
        return self

    def cores(self) -> float:
        """Average number of cores the other processes kept busy since start()."""
        busy, total = cpu_jiffies()
        ncpu = os.cpu_count() or 1
        elapsed = (total - self.total0) / ncpu  # jiffies of wall time
        if elapsed <= 0:
            return 0.0
        foreign = (busy - self.busy0) - (self.ours() - self.ours0)
        return max(0.0, foreign / elapsed)


def engine_cpu_s(engine_pid: int) -> float:
    return tree_cpu_s(descendants(engine_pid) | {engine_pid})


@dataclass
class CpuWindow:
    """Wall-clock bounds of a checkpoint window and the engine's CPU time within them."""

    start: float
    end: float
    engine_cpu_s: float

    def tokens(self, traces: Sequence[StreamTrace]) -> int:
        return sum(self.start < t <= self.end for trace in traces for t in trace.times)


@dataclass
class Probe:
    """Side measurements taken on the first request's stream, keyed by token count."""

    url: str
    engine_pid: int
    checkpoints: Sequence[int]
    window: int
    kv_used: dict[int, float | None] = field(default_factory=dict)
    foreign: dict[int, float] = field(default_factory=dict)
    cpu: dict[int, CpuWindow] = field(default_factory=dict)
    _open: dict[int, ForeignCpu] = field(default_factory=dict)
    _cpu_open: dict[int, tuple[float, float]] = field(default_factory=dict)
    _done: set[tuple[str, int]] = field(default_factory=set)

    async def on_tokens(self, client: httpx.AsyncClient, n: int, now: float) -> None:
        for cp in self.checkpoints:
            if n >= cp - self.window and ("start", cp) not in self._done:
                self._done.add(("start", cp))
                self._open[cp] = ForeignCpu(self.engine_pid).start()
                self._cpu_open[cp] = (now, engine_cpu_s(self.engine_pid))
            if n >= cp - self.window // 2 and ("kv", cp) not in self._done:
                self._done.add(("kv", cp))
                self.kv_used[cp] = await kv_used(client, self.url)
            if n >= cp and ("end", cp) not in self._done and cp in self._open:
                self._done.add(("end", cp))
                self.foreign[cp] = self._open.pop(cp).cores()
                t0, cpu0 = self._cpu_open.pop(cp)
                self.cpu[cp] = CpuWindow(t0, now, engine_cpu_s(self.engine_pid) - cpu0)


def parse_metric(text: str, name: str) -> float | None:
    total: float | None = None
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


async def kv_used(client: httpx.AsyncClient, url: str) -> float | None:
    try:
        resp = await client.get(f"{url}/metrics", timeout=10)
        return parse_metric(resp.text, KV_USED_METRIC)
    except httpx.HTTPError:
        return None


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    trace: StreamTrace,
    probe: Probe | None,
) -> None:
    async with client.stream("POST", f"{url}/generate", json=payload, timeout=None) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"/generate returned {resp.status_code}: {body}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"/generate stream error: {chunk['error']}")
            meta = chunk["meta_info"]
            trace.prompt_tokens = int(meta.get("prompt_tokens", 0))
            trace.record(int(meta["completion_tokens"]), now)
            if probe is not None:
                await probe.on_tokens(client, len(trace.times), now)


async def run_arm(
    url: str,
    engine_pid: int,
    arm: Arm,
    prompt: str,
    max_len: int,
    concurrency: int,
    checkpoints: Sequence[int],
    window: int,
) -> RunResult:
    sampling: dict[str, Any] = {
        "max_new_tokens": max_len,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    custom = arm.custom_params()
    if custom is not None:
        sampling["custom_params"] = custom
    payload = {"text": prompt, "sampling_params": sampling, "stream": True}
    traces = [StreamTrace() for _ in range(concurrency)]
    probe = Probe(url, engine_pid, checkpoints, window)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                stream_one(client, url, payload, t, probe if i == 0 else None)
                for i, t in enumerate(traces)
            )
        )
        wall = time.perf_counter() - start
    for i, t in enumerate(traces):
        if len(t.times) != max_len:
            raise RuntimeError(
                f"{arm.name}: request {i} streamed {len(t.times)} tokens, expected {max_len}"
            )
    results: dict[str, CheckpointResult] = {}
    for cp in checkpoints:
        rates = [t.rate(cp - window, cp) for t in traces]
        cpu = probe.cpu.get(cp)
        results[str(cp)] = CheckpointResult(
            tok_s=sum(rates),
            per_request_tok_s=sum(rates) / len(rates),
            kv_used_tokens=probe.kv_used.get(cp),
            foreign_cpu_cores=probe.foreign.get(cp),
            tok_per_engine_cpu_s=(
                cpu.tokens(traces) / cpu.engine_cpu_s if cpu and cpu.engine_cpu_s > 0 else None
            ),
        )
    return RunResult(
        arm=arm.name,
        engine=arm.engine,
        policy=arm.policy,
        budget_tokens=arm.budget_tokens,
        concurrency=concurrency,
        max_len=max_len,
        prompt_tokens=traces[0].prompt_tokens,
        wall_s=wall,
        mean_tok_s=concurrency * max_len / wall,
        checkpoints=results,
    )


async def warm_up(url: str, prompt: str, concurrency: int) -> None:
    payload = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
    }
    async with httpx.AsyncClient() as client:
        resps = await asyncio.gather(
            *(client.post(f"{url}/generate", json=payload, timeout=600) for _ in range(concurrency))
        )
    for r in resps:
        r.raise_for_status()


def server_info(url: str) -> dict[str, Any]:
    for path in ("/get_server_info", "/server_info"):
        try:
            resp = httpx.get(f"{url}{path}", timeout=30)
        except httpx.HTTPError:
            continue
        if resp.status_code == 200:
            info: dict[str, Any] = resp.json()
            return info
    return {}


def pool_tokens(info: dict[str, Any]) -> int | None:
    value = info.get("max_total_num_tokens")
    if value is None:
        for state in info.get("internal_states") or []:
            if isinstance(state, dict) and "max_total_num_tokens" in state:
                value = state["max_total_num_tokens"]
                break
    return int(value) if value is not None else None


def model_max_positions(model_path: str) -> int | None:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if value is not None else None


@dataclass(frozen=True)
class LevelPlan:
    """What runs at one concurrency level."""

    concurrency: int
    max_len: int
    checkpoints: tuple[int, ...]
    arms: tuple[Arm, ...]


@dataclass
class Recorder:
    """Collects results and rewrites the JSON after every run (a crash keeps the rest)."""

    path: Path
    header: dict[str, Any]
    budgets: Sequence[int]
    plans: Sequence[LevelPlan]
    runs: list[RunResult] = field(default_factory=list)
    engines: dict[str, Any] = field(default_factory=dict)

    def add(self, run: RunResult) -> None:
        self.runs.append(run)
        self.write(complete=False)

    def write(self, complete: bool) -> dict[str, Any]:
        summary = summarize(self.runs, self.budgets, self.plans)
        result = {
            **self.header,
            "complete": complete,
            "engines": self.engines,
            "runs": [asdict(r) for r in self.runs],
            "summary": summary,
            "summary_engine_cpu": summarize(
                self.runs, self.budgets, self.plans, measure="tok_per_engine_cpu_s"
            ),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(self.path)
        return summary


def engine_runs(
    engine: str,
    plans: Sequence[LevelPlan],
    args: argparse.Namespace,
    max_total_tokens: int,
    context_length: int,
    recorder: Recorder,
) -> None:
    env: dict[str, str] = {}
    limit = model_max_positions(args.model_path)
    if limit is not None and context_length > limit:
        env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
    options: dict[str, Any] = {
        "attention_backend": engine,
        "dtype": args.dtype,
        "max_total_tokens": max_total_tokens,
        "context_length": context_length,
        "max_running_requests": max(p.concurrency for p in plans),
    }
    if args.mem_fraction_static is not None:
        options["mem_fraction_static"] = args.mem_fraction_static
    todo = run_order(plans, engine, args.repeats)
    restarts = 0
    while todo:
        log(f"[{engine}] starting engine (waits for the machine-wide engine lock) {options}")
        t0 = time.perf_counter()
        with sglang_server(args.model_path, env=env, **options) as server:
            log(f"[{engine}] healthy {time.perf_counter() - t0:.0f}s after asking for it")
            pool = pool_tokens(server_info(server.url))
            recorder.engines[engine] = {
                "options": options,
                "env": env,
                "max_total_num_tokens": pool,
                "restarts": restarts,
            }
            if pool is not None and pool < max_total_tokens:
                raise RuntimeError(
                    f"engine pool holds {pool} tokens, the benchmark needs {max_total_tokens}: "
                    "dense requests would queue or be retracted (raise --mem-fraction-static)"
                )
            warmed: set[int] = set()
            while todo:
                plan, arm, repeat = todo[0]
                try:
                    if plan.concurrency not in warmed:
                        asyncio.run(warm_up(server.url, args.prompt, plan.concurrency))
                        warmed.add(plan.concurrency)
                    recorder.add(run_and_log(server, arm, args, plan, repeat))
                except Exception:
                    # Only an engine that died under us (killed from outside) is retried.
                    if not engine_died(server) or restarts >= args.engine_restarts:
                        raise
                    restarts += 1
                    log(f"[{engine}] the engine died during {arm.name}; restart {restarts}")
                    break
                todo.pop(0)


def run_order(
    plans: Sequence[LevelPlan], engine: str, repeats: int
) -> list[tuple[LevelPlan, Arm, int]]:
    """The runs of one engine: per level, `repeats` passes over its arms, every other
    pass reversed so that each arm runs as often early as late (ABBA)."""
    order: list[tuple[LevelPlan, Arm, int]] = []
    for plan in plans:
        arms = [arm for arm in plan.arms if arm.engine == engine]
        for repeat in range(repeats):
            order += [(plan, arm, repeat) for arm in (arms if repeat % 2 == 0 else arms[::-1])]
    return order


def engine_died(server: RunningServer, grace_s: float = 20.0) -> bool:
    """Whether the engine has exited (its launcher takes a few seconds to follow a child)."""
    deadline = time.monotonic() + grace_s
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return server.process.poll() is not None


def wait_for_quiet(server: RunningServer, args: argparse.Namespace) -> None:
    """Wait until other processes leave the CPU to us (the machine is shared), up to a limit."""
    if args.quiet_wait_s <= 0:
        return
    deadline = time.monotonic() + args.quiet_wait_s
    while True:
        probe = ForeignCpu(server.process.pid).start()
        time.sleep(QUIET_SAMPLE_S)
        load = probe.cores()
        if load <= args.quiet_cores:
            return
        if time.monotonic() >= deadline:
            log(f"    machine still busy ({load:.2f} foreign cores); measuring anyway")
            return
        log(f"    other processes use {load:.2f} cores; waiting for a quiet machine")


def run_and_log(
    server: RunningServer, arm: Arm, args: argparse.Namespace, plan: LevelPlan, repeat: int
) -> RunResult:
    passes = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
    log(f"[{arm.engine}] {arm.name} x{plan.concurrency}: {plan.max_len} tokens{passes} ...")
    wait_for_quiet(server, args)
    foreign = ForeignCpu(server.process.pid).start()
    try:
        res = asyncio.run(
            run_arm(
                server.url,
                server.process.pid,
                arm,
                args.prompt,
                plan.max_len,
                plan.concurrency,
                plan.checkpoints,
                args.window,
            )
        )
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- SGLang log ---\n{server.log_tail()}") from exc
    res.foreign_cpu_cores = foreign.cores()
    res.repeat = repeat
    rates = ", ".join(f"{k}: {v.tok_s:.2f}" for k, v in res.checkpoints.items())
    log(
        f"    {res.wall_s:.0f}s, other processes used {res.foreign_cpu_cores:.2f} cores; "
        f"tok/s at {rates}"
    )
    return res


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def summarize(
    runs: Sequence[RunResult],
    budgets: Sequence[int],
    plans: Sequence[LevelPlan],
    measure: str = "tok_s",
) -> dict[str, Any]:
    """Per concurrency and checkpoint: `measure` of each arm (wall-clock tok/s, or tokens
    per engine CPU-second), raas/dense ratios, overhead %.

    With several repeats an arm's figure is the geometric mean over them (so the ratio of
    two arms is the geometric mean of the per-repeat ratios), "tok_s_each" lists each
    repeat's figure and "ratio_vs_dense_each" each repeat's own raas/dense ratio.

    Overhead below budget compares, over the same window, dense with every raas arm whose
    budget was not reached by the end of the window (L <= budget), the never-reached arm
    included; + means raas is slower. The key "tok_s" holds the measure either way.
    """
    each: dict[tuple[str, int, int], dict[int, float]] = {}
    foreign: dict[tuple[str, int, int], float] = {}
    for r in runs:
        for cp, c in r.checkpoints.items():
            key = (r.arm, r.concurrency, int(cp))
            value = getattr(c, measure)
            if value is not None:
                each.setdefault(key, {})[r.repeat] = value
            if c.foreign_cpu_cores is not None:
                foreign[key] = max(foreign.get(key, 0.0), c.foreign_cpu_cores)
    rate = {key: geometric_mean(list(v.values())) for key, v in each.items()}
    budget_of = {r.arm: r.budget_tokens for r in runs}
    repeated = any(r.repeat > 0 for r in runs)
    summary: dict[str, Any] = {}
    for plan in plans:
        conc = plan.concurrency
        per_cp: dict[str, Any] = {}
        for cp in plan.checkpoints:
            here = {arm: v for (arm, c, point), v in rate.items() if c == conc and point == cp}
            if not here:
                continue
            dense = here.get("dense")
            tn = here.get("torch_native")
            row: dict[str, Any] = {
                "tok_s": here,
                "foreign_cpu_cores": {arm: foreign.get((arm, conc, cp)) for arm in here},
                "ratio_vs_dense": {
                    arm: ratio(v, dense) for arm, v in here.items() if arm != "dense"
                },
                "overhead_pct_vs_dense": {
                    arm: pct_overhead(v, dense)
                    for arm, v in here.items()
                    if arm.startswith("raas_") and cp <= (budget_of.get(arm) or 0)
                },
            }
            if repeated:
                row["tok_s_each"] = {
                    arm: [v for _, v in sorted(each[(arm, conc, cp)].items())] for arm in here
                }
                dense_each = each.get(("dense", conc, cp), {})
                row["ratio_vs_dense_each"] = {
                    arm: [
                        v / dense_each[rep] if dense_each.get(rep) else None
                        for rep, v in sorted(each[(arm, conc, cp)].items())
                    ]
                    for arm in here
                    if arm != "dense"
                }
            ceiling = dense_ceiling(rate, conc, cp, plan.checkpoints, budget_of)
            if ceiling:
                row["ratio_ceiling"] = ceiling
            if tn is not None:
                row["overhead_pct_vs_torch_native"] = {
                    arm: pct_overhead(v, tn)
                    for arm, v in here.items()
                    if arm == "dense" or (arm.startswith("raas_") and cp <= (budget_of[arm] or 0))
                }
            per_cp[str(cp)] = row
        flat: dict[str, Any] = {}
        for b in budgets:
            after = [
                (cp, rate[(f"raas_{b}", conc, cp)])
                for cp in plan.checkpoints
                if cp >= b and (f"raas_{b}", conc, cp) in rate
            ]
            if len(after) >= 2:
                values = [v for _, v in after]
                flat[f"raas_{b}"] = {
                    "checkpoints": [cp for cp, _ in after],
                    "tok_s": values,
                    "min_over_max": min(values) / max(values),
                    "last_over_first": values[-1] / values[0],
                }
        summary[str(conc)] = {
            "max_len": plan.max_len,
            "checkpoints": per_cp,
            "flat_after_budget": flat,
        }
    return summary


def dense_ceiling(
    rate: dict[tuple[str, int, int], float],
    conc: int,
    cp: int,
    checkpoints: Sequence[int],
    budget_of: dict[str, int | None],
) -> dict[str, float]:
    """Per raas arm past its budget B: dense's measure at the first checkpoint >= B over
    dense's at cp, the raas/dense ratio raas would reach if its step cost what dense's
    costs at B's length.

    Past its budget raas attends at least as many keys as dense does in that window (the
    prompt, B retained tokens and the tail page), so unless raas's step is cheaper than
    dense's at the same number of keys this bounds its ratio: dense's own slowdown from B
    to cp. A target above it cannot be met on the machine that measured it.
    """
    dense_here = rate.get(("dense", conc, cp))
    out: dict[str, float] = {}
    for arm, budget in budget_of.items():
        if not arm.startswith("raas_") or not budget or cp <= budget or not dense_here:
            continue
        at_budget = next((c for c in sorted(checkpoints) if c >= budget), None)
        dense_at_budget = rate.get(("dense", conc, at_budget)) if at_budget else None
        if dense_at_budget is not None and at_budget is not None and at_budget < cp:
            out[arm] = dense_at_budget / dense_here
    return out


def geometric_mean(values: Sequence[float]) -> float:
    if len(values) == 1:
        return values[0]
    if any(v <= 0 or math.isinf(v) for v in values):
        return min(values) if min(values) <= 0 else math.inf
    return statistics.geometric_mean(values)


def pct_overhead(raas: float | None, base: float | None) -> float | None:
    """Time per token of raas over that of the base, minus one, in %: +10 = 10% slower."""
    if raas is None or base is None or raas <= 0:
        return None
    return (base / raas - 1.0) * 100.0


def each_ratio(row: dict[str, Any], arm: str) -> str:
    values = row.get("ratio_vs_dense_each", {}).get(arm)
    if not values:
        return ""
    return " [" + ", ".join(fmt(v, ".2f") for v in values) + "]"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def below_budget_overhead(row: dict[str, Any], key: str) -> str:
    """The never-reached arm's overhead if measured, else the largest-budget one's."""
    overhead: dict[str, float | None] = row.get(key, {})
    for arm in sorted(
        (a for a in overhead if a != "dense"),
        key=lambda a: (a != "raas_nobudget", -int(a.split("_")[1]) if a[5:].isdigit() else 0),
    ):
        value = overhead[arm]
        if value is not None:
            return f"{value:+.1f} ({arm.removeprefix('raas_')})"
    return "-"


def print_table(
    summary: dict[str, Any], runs: Sequence[RunResult], budgets: Sequence[int], has_tn: bool
) -> None:
    cols = ["conc", "L", "dense"]
    if has_tn:
        cols += ["torch_native"]
    cols += ["raas_nobudget"]
    for b in budgets:
        cols += [f"raas_{b}", f"raas_{b}/dense"]
    cols += ["overhead % vs dense"]
    if has_tn:
        cols += ["dense vs torch_native %", "raas overhead % vs torch_native"]
    cols += ["max foreign cores"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for conc, block in summary.items():
        for cp, row in block["checkpoints"].items():
            tok = row["tok_s"]
            cells = [conc, cp, fmt(tok.get("dense"), ".2f")]
            if has_tn:
                cells.append(fmt(tok.get("torch_native"), ".2f"))
            cells.append(fmt(tok.get("raas_nobudget"), ".2f"))
            for b in budgets:
                cells += [
                    fmt(tok.get(f"raas_{b}"), ".2f"),
                    fmt(row["ratio_vs_dense"].get(f"raas_{b}"), ".2f")
                    + each_ratio(row, f"raas_{b}"),
                ]
            cells.append(below_budget_overhead(row, "overhead_pct_vs_dense"))
            if has_tn:
                vs_tn = row.get("overhead_pct_vs_torch_native", {})
                cells += [
                    fmt(vs_tn.get("dense"), "+.1f"),
                    below_budget_overhead(row, "overhead_pct_vs_torch_native"),
                ]
            loads = [v for v in row["foreign_cpu_cores"].values() if v is not None]
            cells.append(fmt(max(loads) if loads else None, ".2f"))
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(
        "\ntok/s: aggregate decode tokens/s over tokens [L - window, L) of one generation per "
        "request.\noverhead: time per token of raas with its budget not yet reached (the arm "
        "in brackets) vs dense over the same window; + = raas slower.\nmax foreign cores: the "
        "most CPU other processes on the machine used during that window, over the arms."
    )
    if any(r.repeat > 0 for r in runs):
        print(
            "repeats: each figure is the geometric mean over the repeats; in brackets each "
            "repeat's own raas/dense ratio."
        )
    for conc, block in summary.items():
        for cp, row in block["checkpoints"].items():
            for arm, ceiling in row.get("ratio_ceiling", {}).items():
                print(
                    f"concurrency {conc}, {arm} at {cp}: ceiling {ceiling:.2f}x (dense's own "
                    f"slowdown from the budget to {cp}; measured "
                    f"{fmt(row['ratio_vs_dense'].get(arm), '.2f')}x)"
                )
    for conc, block in summary.items():
        for arm, f in block["flat_after_budget"].items():
            pts = ", ".join(
                f"{cp}: {v:.2f}" for cp, v in zip(f["checkpoints"], f["tok_s"], strict=True)
            )
            print(
                f"concurrency {conc}, {arm} from its budget on: {pts} tok/s "
                f"(min/max {f['min_over_max']:.2f}, last/first {f['last_over_first']:.2f})"
            )
    print("\nruns (wall time; cores kept busy by other processes on the machine):")
    for r in runs:
        print(
            f"  x{r.concurrency} {r.arm} (repeat {r.repeat + 1}): {r.wall_s:.0f}s "
            f"for {r.max_len} tokens, "
            f"foreign load {r.foreign_cpu_cores:.2f} cores"
        )


def default_checkpoints(max_len: int, window: int) -> list[int]:
    points = [c for c in STANDARD_CHECKPOINTS if c <= max_len]
    if not points:
        return sorted({max(window + 1, max_len // 2), max_len})
    return sorted({*points, max_len})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SMOKE_USAGE,
    )
    p.add_argument("--out", type=Path, required=True, help="write the JSON results here")
    p.add_argument("--model-path", help="Hugging Face model directory (default: the bundled model)")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 8],
        help="concurrency levels (default %(default)s)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        nargs="+",
        default=[2048],
        help="tokens generated per request: one value, or one per --concurrency level "
        "(default %(default)s)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        help="lengths L at which tok/s is measured over [L - window, L), those above a "
        f"level's max-len dropped (default: {list(STANDARD_CHECKPOINTS)} up to max-len, "
        "and max-len)",
    )
    p.add_argument("--window", type=int, default=64, help="tokens per tok/s window (default 64)")
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[512, 1024],
        help="raas budgets in tokens (default %(default)s)",
    )
    p.add_argument(
        "--no-overhead-arm",
        action="store_true",
        help="skip the raas arm whose budget exceeds the generation (it is skipped anyway "
        "where a --budgets value is >= max-len: that arm measures the same thing)",
    )
    p.add_argument(
        "--torch-native",
        action="store_true",
        help="also run a stock torch_native engine (dense) on the same grid, after the raas one",
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each run, wait until other processes use at most this many cores "
        "(default %(default)s)",
    )
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=900.0,
        help="longest wait for a quiet machine before each run; 0 disables (default %(default)s)",
    )
    p.add_argument(
        "--engine-restarts",
        type=int,
        default=2,
        help="restart an engine that dies mid-run this many times, redoing the run it was "
        "serving (default %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every arm this many times, every other pass in reverse order, and report "
        "geometric means with each pass's ratios (default %(default)s)",
    )
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (default %(default)s)")
    p.add_argument(
        "--context-length", type=int, help="engine context length (default: max-len + 256)"
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        help="engine KV pool in tokens (default: every request dense at max-len, plus slack)",
    )
    p.add_argument(
        "--mem-fraction-static",
        type=float,
        help="engine --mem-fraction-static (default: the engine harness's)",
    )
    p.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="prompt of every request (default: a short reasoning question)",
    )
    return p


def make_plans(args: argparse.Namespace) -> list[LevelPlan]:
    if args.window < 1:
        raise SystemExit("--window must be >= 1")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if min(args.concurrency) < 1:
        raise SystemExit("--concurrency values must be >= 1")
    if len(args.max_len) not in (1, len(args.concurrency)):
        raise SystemExit("--max-len takes one value or one per --concurrency level")
    if len(set(args.concurrency)) != len(args.concurrency):
        raise SystemExit("--concurrency levels must be distinct")
    for b in args.budgets:
        if b < 2 * PAGE_SIZE:
            raise SystemExit(f"budget {b} is below the minimum of {2 * PAGE_SIZE} tokens")
    lengths = args.max_len * len(args.concurrency) if len(args.max_len) == 1 else args.max_len
    plans: list[LevelPlan] = []
    for conc, max_len in sorted(zip(args.concurrency, lengths, strict=True)):
        if max_len <= args.window:
            raise SystemExit(f"max-len {max_len} must exceed --window {args.window}")
        if args.checkpoints:
            points = sorted({c for c in args.checkpoints if c <= max_len})
        else:
            points = default_checkpoints(max_len, args.window)
        bad = [c for c in points if c <= args.window]
        if bad or not points:
            raise SystemExit(f"checkpoints {points} must lie in ({args.window}, {max_len}]")
        arms = [Arm("dense", "raas", "dense")]
        if not args.no_overhead_arm and max(args.budgets) < max_len:
            # A whole number of pages beyond the generation: never reached.
            arms.append(
                Arm("raas_nobudget", "raas", "raas", (max_len // PAGE_SIZE + 2) * PAGE_SIZE)
            )
        arms += [Arm(f"raas_{b}", "raas", "raas", b) for b in args.budgets]
        if args.torch_native:
            arms.append(Arm("torch_native", "torch_native", None))
        plans.append(LevelPlan(conc, max_len, tuple(points), tuple(arms)))
    return plans


def terminate(signum: int, frame: object) -> None:
    # Unwind, so the engine is stopped and the results so far stay on disk.
    log(f"received signal {signum}; stopping the engine (results so far are in --out)")
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.budgets = sorted(set(args.budgets))
    plans = make_plans(args)
    if args.model_path is None:
        from service.engine.bundled_model import prepare_model

        args.model_path = str(prepare_model().path)

    prompt_allowance = 256  # the default prompt is ~70 tokens; room for a longer --prompt
    longest = max(p.max_len for p in plans)
    context_length = args.context_length or longest + prompt_allowance
    max_total_tokens = args.max_total_tokens or (
        max(p.concurrency * (p.max_len + prompt_allowance) for p in plans) + 512
    )

    started = dt.datetime.now(dt.UTC)
    header = {
        "benchmark": "cpu_decode",
        "started_utc": started.isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "environment": {
            "python": platform.python_version(),
            "torch": package_version("torch"),
            "sglang": package_version("sglang"),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "config": {
            "model": Path(args.model_path).name,
            "dtype": args.dtype,
            "window": args.window,
            "repeats": args.repeats,
            "budgets": args.budgets,
            "levels": [asdict(p) for p in plans],
            "context_length": context_length,
            "max_total_tokens": max_total_tokens,
            "prompt": args.prompt,
        },
    }
    recorder = Recorder(args.out, header, args.budgets, plans)
    engines = ["raas", "torch_native"] if args.torch_native else ["raas"]
    for engine in engines:
        engine_runs(engine, plans, args, max_total_tokens, context_length, recorder)
    recorder.header["wall_s"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
    summary = recorder.write(complete=True)
    print("## Wall clock: tokens/s\n")
    print_table(summary, recorder.runs, args.budgets, args.torch_native)
    print("\n## Engine CPU time: tokens per engine CPU-second (robust to a shared machine)\n")
    cpu_summary = summarize(recorder.runs, args.budgets, plans, measure="tok_per_engine_cpu_s")
    print_table(cpu_summary, recorder.runs, args.budgets, args.torch_native)
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    raise SystemExit(main())
