"""What the gateway costs: the same chat requests sent to SGLang directly and through the
gateway, side by side in one run.

Target (issue 25), measured with the gateway on its own core (`--pin`): the gateway's
overhead is <= 1 % of the end-to-end latency of a 128-token answer (the median paired
overhead over the direct arm's median e2e, `--latency-max-tokens 128`), and its
throughput is >= 97 % of calling SGLang directly.

Set-up. One real SGLang engine (`--attention-backend raas`; by default the tiny
random-weight Llama of tests/support/tiny_model.py, so that engine time is small and the
gateway's share shows; `--model bundled` for SmolLM2-135M) and the real gateway
(`raas-serve serve --engine-mode remote`) in its own process, as deployed: a gateway
sharing the client's process would share its event loop and GIL, which neither
production nor a fair comparison has. Both arms use one httpx client with keep-alive
connections (lighter than the openai client, and the same for both arms; the client's
cost cancels out of the difference).

Equivalent work. The gateway turns `kv_policy` into `custom_params`, sets `rid` and, on
streams, always asks the engine for the usage chunk. The direct arm sends exactly the
body the gateway would send (built with the gateway's own `upstream_body`), so the
engine does the same work in both arms. Requests are greedy with `ignore_eos`, so every
answer has exactly `max_tokens` tokens; a short count is an error.

- Latency: one request at a time, pairs alternating direct/gateway, the order flipped
  on every pair (AB BA AB ...) so that drift and any order effect hit both arms alike.
  Per-pair overhead = gateway - direct, for e2e and (streams) TTFT: the time until the
  first chunk that carries content.
- Throughput: closed loop at concurrency C for a fixed number of requests per block; a
  round is one block per arm back to back, the first arm flipped every round. Reported:
  requests/s and output tokens/s over all blocks of an arm with their ratio, and the
  paired estimate the target is judged on: the geometric mean of the rounds'
  gateway/direct ratios with a bootstrap 95 % interval (the engine's own throughput
  drifts by more than the effect measured; within a round it mostly cancels).

`--engine stub` replaces SGLang by benchmarks/stub_engine.py (canned answers, no model):
the overhead then is the gateway's own cost without engine noise; its throughput ratio
says nothing about the target.

`--pin ENGINE:GATEWAY` (CPU lists, e.g. `0:1`) gives the engine's whole process tree
its own CPUs and the gateway and the load client the others, as a deployment does (the
engine on its accelerator's host cores, the gateway apart); the direct arm's client
runs on the gateway's CPUs too, so both arms see the same engine. Without it all three
share every CPU, and on a small machine the gateway's CPU is taken from the engine's
decode. The affinity of every engine and gateway thread is read back and recorded.
`--client-cpus` moves the load client (both arms' client) elsewhere, e.g. onto the
engine's CPU: on a 2-CPU machine the client beside the gateway wakes on the gateway's
CPU with every write the gateway makes and delays the gateway's next step, a cost a
remote client does not impose; beside the engine it costs both arms alike.

The CPU used by the gateway process and by anything outside the benchmark (other
users of a shared machine) is recorded per phase. Prints a table with the ratios and
whether each target is met; --out writes everything as JSON.

Full run (about 12 minutes on 2 cores):
  python benchmarks/gateway_overhead.py --out gateway_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_decode import (  # noqa: E402
    cpu_jiffies,
    log,
    package_version,
    terminate,
)
from service.api.schemas import ChatCompletionRequest  # noqa: E402
from service.chat.kv_policy import PolicyLimits, resolve_request  # noqa: E402
from service.chat.request import upstream_body  # noqa: E402
from service.server.settings import Settings  # noqa: E402
from tests.support.gateway_server import wait_ready  # noqa: E402
from tests.support.sglang_server import (  # noqa: E402
    descendants,
    free_port,
    sglang_server,
    stop_process_group,
    tree_cpu_s,
    tree_jiffies,
    wait_healthy,
)
from tests.support.tiny_model import make_tiny_model  # noqa: E402

MODEL_NAME = "bench"
CHAT_PATH = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Name three colours and say why the sky is blue."}]
ARMS = ("direct", "gateway")
MODES = ("nonstream", "stream")
QUANTILES = (50, 90, 99)
TARGET_OVERHEAD_SHARE = 0.01
TARGET_THROUGHPUT_RATIO = 0.97
# The gateway under cProfile with a CPU-time clock: on a shared machine a wall clock
# charges other processes' time slices to whatever function was running. uvicorn returns
# from main() on SIGTERM, so the stats get written.
PROFILED_GATEWAY = """
import cProfile, sys, time
from service.cli import main
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    main(sys.argv[2:])
finally:
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
"""


@dataclass(frozen=True)
class Sample:
    e2e_s: float
    ttft_s: float | None
    completion_tokens: int


@dataclass
class Endpoints:
    """Where each arm sends its requests, and the body each arm sends."""

    direct_url: str
    gateway_url: str
    kv_policy: dict[str, Any]
    settings: Settings

    def base(self, arm: str) -> str:
        return self.direct_url if arm == "direct" else self.gateway_url

    def url(self, arm: str) -> str:
        return self.base(arm) + CHAT_PATH

    def client_body(self, stream: bool, max_tokens: int) -> dict[str, Any]:
        return client_body(stream, max_tokens, self.kv_policy)

    def bodies(self, stream: bool, max_tokens: int) -> dict[str, dict[str, Any]]:
        """Per arm: the client's body to the gateway, and what the gateway sends SGLang."""
        client = self.client_body(stream, max_tokens)
        req = ChatCompletionRequest.model_validate(client)
        policy = resolve_request(req.kv_policy, None, PolicyLimits.for_caller(self.settings, None))
        direct = upstream_body(req, policy, "placeholder", self.settings)
        return {"direct": direct, "gateway": client}


def client_body(stream: bool, max_tokens: int, kv_policy: dict[str, Any]) -> dict[str, Any]:
    """What a client sends the gateway: greedy, exactly `max_tokens` tokens (ignore_eos)."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
        "kv_policy": kv_policy,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    return tree_cpu_s(descendants(pid) | {pid})


def with_rid(arm: str, body: dict[str, Any]) -> dict[str, Any]:
    # The gateway gives every request a fresh rid; the direct arm must too (SGLang
    # rejects a rid that is still in flight).
    if arm != "direct":
        return body
    return {**body, "rid": f"chatcmpl-{uuid.uuid4().hex}"}


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    if not body.get("stream"):
        resp = await client.post(url, json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{url} returned {resp.status_code}: {resp.text[:500]}")
        data = resp.json()
        return Sample(time.perf_counter() - start, None, int(data["usage"]["completion_tokens"]))
    ttft: float | None = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        async for chunk in sse_chunks(resp, url):
            if ttft is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()
            ):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                tokens = int(usage["completion_tokens"])
    return Sample(time.perf_counter() - start, ttft, tokens)


async def sse_chunks(resp: httpx.Response, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI-style SSE stream up to `[DONE]`; errors raise."""
    if resp.status_code != 200:
        text = (await resp.aread()).decode(errors="replace")
        raise RuntimeError(f"{url} returned {resp.status_code}: {text[:500]}")
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"{url} stream error: {chunk['error']}")
        yield chunk


def check_tokens(arm: str, sample: Sample, expected: int) -> None:
    if sample.completion_tokens != expected:
        raise RuntimeError(
            f"{arm}: expected {expected} completion tokens (ignore_eos), "
            f"got {sample.completion_tokens}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("expected at least one value, got none")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def quantiles_ms(values: Sequence[float]) -> dict[str, float]:
    stats = {f"p{q}": 1000 * percentile(values, q) for q in QUANTILES}
    stats["mean"] = 1000 * sum(values) / len(values)
    return stats


@dataclass
class CpuMeter:
    """CPU seconds of the gateway process and of everything outside the benchmark."""

    gateway_pid: int
    engine_pid: int
    start_wall: float = 0.0
    start_busy: int = 0
    start_gateway: float = 0.0
    start_ours: int = 0

    def _gateway(self) -> float:
        return process_tree_cpu_s(self.gateway_pid)

    def _ours(self) -> int:
        pids = {self.engine_pid, self.gateway_pid, os.getpid()}
        pids |= descendants(self.engine_pid) | descendants(self.gateway_pid)
        return tree_jiffies(pids)

    def start(self) -> CpuMeter:
        self.start_wall = time.perf_counter()
        self.start_busy = cpu_jiffies()[0]
        self.start_gateway = self._gateway()
        self.start_ours = self._ours()
        return self

    def read(self) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self.start_wall
        foreign = (cpu_jiffies()[0] - self.start_busy) - (self._ours() - self.start_ours)
        return {
            "gateway_cpu_s": self._gateway() - self.start_gateway,
            "foreign_cpu_cores": max(0.0, foreign / hz / wall) if wall > 0 else 0.0,
        }


async def latency_mode(
    ends: Endpoints, stream: bool, pairs: int, max_tokens: int, warmup: int
) -> dict[str, Any]:
    bodies = ends.bodies(stream, max_tokens)
    samples: dict[str, list[Sample]] = {arm: [] for arm in ARMS}
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        for i in range(warmup + pairs):
            order = ARMS if i % 2 == 0 else ARMS[::-1]
            for arm in order:
                sample = await send(client, ends.url(arm), with_rid(arm, bodies[arm]))
                check_tokens(arm, sample, max_tokens)
                if i >= warmup:
                    samples[arm].append(sample)
    direct, gateway = samples["direct"], samples["gateway"]
    e2e_diffs = [g.e2e_s - d.e2e_s for d, g in zip(direct, gateway, strict=True)]
    result: dict[str, Any] = {
        "pairs": pairs,
        "max_tokens": max_tokens,
        "e2e_ms": {arm: quantiles_ms([s.e2e_s for s in samples[arm]]) for arm in ARMS},
        "overhead_e2e_ms": quantiles_ms(e2e_diffs),
        "overhead_e2e_p50_ci95_ms": median_ci_ms(e2e_diffs),
        "overhead_e2e_pairs_ms": [round(1000 * x, 3) for x in e2e_diffs],
    }
    if stream:
        ttft = {arm: [s.ttft_s for s in samples[arm]] for arm in ARMS}
        if any(t is None for arm in ARMS for t in ttft[arm]):
            raise RuntimeError("a stream carried no content chunk: TTFT undefined")
        result["ttft_ms"] = {arm: quantiles_ms(ttft[arm]) for arm in ARMS}  # type: ignore[arg-type]
        ttft_diffs = [g - d for d, g in zip(ttft["direct"], ttft["gateway"], strict=True)]  # type: ignore[operator]
        result["overhead_ttft_ms"] = quantiles_ms(ttft_diffs)
        result["overhead_ttft_p50_ci95_ms"] = median_ci_ms(ttft_diffs)
        result["overhead_ttft_pairs_ms"] = [round(1000 * x, 3) for x in ttft_diffs]
    return result


@dataclass
class Block:
    arm: str
    wall_s: float
    requests: int
    output_tokens: int
    gateway_cpu_s: float
    foreign_cpu_cores: float


async def closed_loop(
    ends: Endpoints, arm: str, body: dict[str, Any], concurrency: int, requests: int
) -> tuple[float, int]:
    remaining = requests
    tokens = 0
    expected = int(body.get("max_tokens") or 0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        # Open the connections before the clock starts, as a long-running client has them.
        await asyncio.gather(
            *(client.get(ends.base(arm) + "/v1/models") for _ in range(concurrency))
        )

        async def worker() -> None:
            nonlocal remaining, tokens
            while remaining > 0:
                remaining -= 1
                sample = await send(client, ends.url(arm), with_rid(arm, body))
                check_tokens(arm, sample, expected)
                tokens += sample.completion_tokens

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, tokens


def paired_ratios(blocks: Sequence[Block]) -> list[float]:
    """Gateway / direct output tokens/s of each round: its two blocks ran back to back, so
    the engine's slow drift (blocks of identical work varied by +-12 % over minutes here)
    mostly cancels within a pair, and the spread of the pairs gives an interval."""
    ratios: list[float] = []
    for i in range(0, len(blocks) - 1, 2):
        by_arm = {b.arm: b for b in blocks[i : i + 2]}
        if set(by_arm) != set(ARMS):
            raise ValueError(f"round {i // 2} does not hold one block per arm")
        gw, direct = by_arm["gateway"], by_arm["direct"]
        ratios.append((gw.output_tokens / gw.wall_s) / (direct.output_tokens / direct.wall_s))
    return ratios


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float],
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over `values` (None with fewer than
    three values: no interval worth the name). Seeded: a rerun on the same data agrees."""
    if len(values) < 3:
        return None
    rng = random.Random(seed)
    stats = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    return (
        stats[int((1 - level) / 2 * resamples)],
        stats[min(resamples - 1, int((1 + level) / 2 * resamples))],
    )


def geometric_mean_ci(
    ratios: Sequence[float], level: float = 0.95
) -> tuple[float, float | None, float | None]:
    """Geometric mean of the ratios and its bootstrap interval over rounds."""
    logs = [math.log(r) for r in ratios]
    point = math.exp(sum(logs) / len(logs))
    ci = bootstrap_ci(logs, lambda xs: sum(xs) / len(xs), level)
    if ci is None:
        return point, None, None
    return point, math.exp(ci[0]), math.exp(ci[1])


def median_ci_ms(diffs_s: Sequence[float]) -> list[float] | None:
    """95 % interval of the median overhead (ms): with the engine's step jitter in both
    arms, the p50 of 200 pair differences moves by about a millisecond run to run."""
    ci = bootstrap_ci(diffs_s, lambda xs: percentile(xs, 50))
    return [1000 * ci[0], 1000 * ci[1]] if ci else None


async def throughput_level(
    ends: Endpoints,
    meter_for: Callable[[], CpuMeter],
    stream: bool,
    concurrency: int,
    requests: int,
    rounds: int,
    max_tokens: int,
) -> dict[str, Any]:
    bodies = ends.bodies(stream, max_tokens)
    for arm in ARMS:  # warm-up: batch shapes, connection pools, JIT paths
        await closed_loop(ends, arm, bodies[arm], concurrency, concurrency)
    blocks: list[Block] = []
    for r in range(rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            meter = meter_for().start()
            wall, tokens = await closed_loop(ends, arm, bodies[arm], concurrency, requests)
            cpu = meter.read()
            blocks.append(Block(arm, wall, requests, tokens, **cpu))
    per_arm: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        mine = [b for b in blocks if b.arm == arm]
        wall = sum(b.wall_s for b in mine)
        reqs = sum(b.requests for b in mine)
        per_arm[arm] = {
            "requests_per_s": reqs / wall,
            "output_tokens_per_s": sum(b.output_tokens for b in mine) / wall,
            "gateway_cpu_ms_per_request": 1000 * sum(b.gateway_cpu_s for b in mine) / reqs,
            "foreign_cpu_cores": sum(b.foreign_cpu_cores * b.wall_s for b in mine) / wall,
        }
    pairs = paired_ratios(blocks)
    paired, lo, hi = geometric_mean_ci(pairs)
    return {
        "concurrency": concurrency,
        "requests_per_block": requests,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "arms": per_arm,
        "paired_ratios": pairs,
        "ratio_paired": paired,
        "ratio_paired_ci95": [lo, hi] if lo is not None else None,
        "ratio_requests_per_s": per_arm["gateway"]["requests_per_s"]
        / per_arm["direct"]["requests_per_s"],
        "ratio_output_tokens_per_s": per_arm["gateway"]["output_tokens_per_s"]
        / per_arm["direct"]["output_tokens_per_s"],
        "blocks": [asdict(b) for b in blocks],
    }


def parse_cpus(text: str) -> set[int]:
    """`0-2,5` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"reversed CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


def parse_cpu_arg(text: str) -> set[int]:
    try:
        cpus = parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad CPU list {text!r}") from exc
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"CPUs {text!r} are not all available here")
    return cpus


def parse_pin(text: str) -> tuple[set[int], set[int]]:
    engine_text, sep, gateway_text = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected ENGINE_CPUS:GATEWAY_CPUS, e.g. 0:1")
    try:
        engine, gateway = parse_cpus(engine_text), parse_cpus(gateway_text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad CPU list in {text!r}") from exc
    available = os.sched_getaffinity(0)
    if engine & gateway or not (engine | gateway) <= available:
        raise argparse.ArgumentTypeError(
            f"engine and gateway CPUs must be disjoint and among {sorted(available)}"
        )
    return engine, gateway


@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block on these CPUs: processes started in it inherit them."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def tree_affinity(pid: int) -> list[int]:
    """The CPUs any thread of the process tree may run on (a child that re-pinned
    itself would widen or move this)."""
    cpus: set[int] = set()
    for proc in descendants(pid) | {pid}:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for tid in os.listdir(f"/proc/{proc}/task"):
                with contextlib.suppress(OSError):
                    cpus |= os.sched_getaffinity(int(tid))
    return sorted(cpus)


def engine_flags(pid: int) -> list[str]:
    """The engine's command-line options, without the interpreter, module and paths
    (a run's temporary model directory says nothing and is a local path)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    flags = [a for a in argv if a.startswith("--")]
    return [f for f in flags if f != "--model-path"]


@dataclass(frozen=True)
class Engine:
    url: str
    pid: int
    model: Path  # what the gateway reads config.json from


@contextlib.contextmanager
def engine_server(
    kind: str,
    model: str,
    bundled: Path,
    workdir: Path,
    sleep_on_idle: bool = False,
    stub_delay_ms: float = 0.0,
    stub_token_delay_ms: float = 0.0,
) -> Iterator[Engine]:
    """SGLang (holding the heavy-process lock, as every engine start does), or the stub."""
    if kind == "stub":
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.stub_engine:app"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        env = {
            **os.environ,
            "STUB_DELAY_MS": str(stub_delay_ms),
            "STUB_TOKEN_DELAY_MS": str(stub_token_delay_ms),
        }
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, timeout=60)
            yield Engine(url, proc.pid, bundled)
        finally:
            stop_process_group(proc)
        return
    extra = ["--served-model-name", MODEL_NAME]
    if sleep_on_idle:
        extra.append("--sleep-on-idle")
    path = bundled
    if model == "tiny":
        path = make_tiny_model(bundled, workdir / "tiny")
        extra += ["--load-format", "dummy"]
    with sglang_server(
        str(path), dtype="float32", attention_backend="raas", extra_args=tuple(extra)
    ) as srv:
        yield Engine(srv.url, srv.process.pid, path)


@contextlib.contextmanager
def gateway_process(
    engine_url: str,
    model_path: Path,
    workdir: Path,
    profile: Path | None,
    root: Path = ROOT,
    name: str = "gateway",
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The gateway of the source tree `root` (run from there, so its `service` package is
    the one imported), logging to `<workdir>/<name>.log`."""
    port = free_port()
    cmd = [sys.executable]
    if profile is None:
        cmd += ["-m", "service.cli"]
    else:
        cmd += ["-c", PROFILED_GATEWAY, str(profile)]
    cmd += ["serve", "--engine-mode", "remote", "--engine-url", engine_url]
    cmd += ["--port", str(port), "--model-name", MODEL_NAME, "--model-path", str(model_path)]
    env = {**os.environ, "RAAS_ENGINE_DTYPE": "float32"}
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout_s=60)
        except TimeoutError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}\n--- gateway log ---\n{tail}") from exc
        yield url, proc
    finally:
        stop_process_group(proc, grace_s=20)


def profile_shares(path: Path, top: int = 15) -> list[dict[str, Any]]:
    """The gateway's CPU time by where the code runs: a package, the gateway's own
    modules or the standard library, from the cProfile stats."""
    import pstats

    by_place: dict[str, float] = {}
    for (filename, _, func), (_, _, own_s, _, _) in pstats.Stats(str(path)).stats.items():
        if "site-packages/" in filename:
            place = filename.split("site-packages/", 1)[1].split("/", 1)[0]
        elif f"{os.sep}service{os.sep}" in filename:
            place = "service (the gateway's own code)"
        elif filename.startswith(("~", "<")):
            place = f"builtin {func}"
        else:
            place = "stdlib " + "/".join(Path(filename).parts[-2:])
        by_place[place] = by_place.get(place, 0.0) + own_s
    total = sum(by_place.values())
    ranked = sorted(by_place.items(), key=lambda item: -item[1])[:top]
    return [{"where": k, "cpu_s": round(v, 3), "share": round(v / total, 4)} for k, v in ranked]


def target_row(
    target: str, measured: float, ci: Sequence[float] | None, ok: Callable[[float], bool]
) -> dict[str, Any]:
    """One target's verdict on the point estimate, and whether its 95 % interval lies
    wholly on one side of the threshold (else the run cannot tell met from missed)."""
    return {
        "target": target,
        "measured": round(measured, 4),
        "ci95": [round(c, 4) for c in ci] if ci else None,
        "met": ok(measured),
        "resolved": ci is not None and ok(ci[0]) == ok(ci[1]),
    }


def targets(latency: dict[str, Any], throughput: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    limit = TARGET_OVERHEAD_SHARE
    for mode, res in latency.items():
        # The overhead as a share of what a client waits for the answer anyway.
        direct_ms = res["e2e_ms"]["direct"]["p50"]
        ci = res.get("overhead_e2e_p50_ci95_ms")
        rows.append(
            target_row(
                f"gateway overhead p50 <= {limit:.0%} of direct e2e p50 "
                f"({mode}, {res['max_tokens']} tokens)",
                res["overhead_e2e_ms"]["p50"] / direct_ms,
                [c / direct_ms for c in ci] if ci else None,
                lambda x: x <= limit,
            )
        )
    for level in throughput:
        # Judged on the paired estimate (geometric mean of the rounds' ratios); the ratio
        # of the arms' totals is in the table and the JSON beside it.
        rows.append(
            target_row(
                f"throughput gateway/direct >= {TARGET_THROUGHPUT_RATIO:g} "
                f"({level['mode']}, C={level['concurrency']}, paired)",
                level["ratio_paired"],
                level.get("ratio_paired_ci95"),
                lambda x: x >= TARGET_THROUGHPUT_RATIO,
            )
        )
    return rows


def print_report(result: dict[str, Any]) -> None:
    print("\nLatency (ms; one request at a time, pairs alternating direct/gateway)")
    print(f"{'mode':<10} {'metric':<6} {'arm':<9} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
    for mode, res in result["latency"].items():
        for metric in ("e2e", "ttft"):
            if f"{metric}_ms" not in res:
                continue
            rows = {**res[f"{metric}_ms"], "overhead": res[f"overhead_{metric}_ms"]}
            for arm, q in rows.items():
                ci = res.get(f"overhead_{metric}_p50_ci95_ms") if arm == "overhead" else None
                print(
                    f"{mode:<10} {metric:<6} {arm:<9} {q['p50']:>8.2f} {q['p90']:>8.2f} "
                    f"{q['p99']:>8.2f} {q['mean']:>8.2f}"
                    + (f"   p50 95% CI {ci[0]:.2f}-{ci[1]:.2f}" if ci else "")
                )
    print("\nThroughput (closed loop; arms alternating by block, rounds AB BA AB ...)")
    print(
        f"{'mode':<10} {'C':>3} {'direct req/s':>12} {'gw req/s':>9} {'direct tok/s':>12} "
        f"{'gw tok/s':>9} {'gw/direct':>9} {'paired':>7} {'paired 95% CI':>14} "
        f"{'gw CPU ms/req':>13} {'foreign cores':>13}"
    )
    for lvl in result["throughput"]:
        d, g = lvl["arms"]["direct"], lvl["arms"]["gateway"]
        ci = lvl.get("ratio_paired_ci95")
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"
        print(
            f"{lvl['mode']:<10} {lvl['concurrency']:>3} {d['requests_per_s']:>12.1f} "
            f"{g['requests_per_s']:>9.1f} {d['output_tokens_per_s']:>12.0f} "
            f"{g['output_tokens_per_s']:>9.0f} {lvl['ratio_output_tokens_per_s']:>9.3f} "
            f"{lvl['ratio_paired']:>7.3f} {ci_text:>14} "
            f"{g['gateway_cpu_ms_per_request']:>13.2f} "
            f"{max(d['foreign_cpu_cores'], g['foreign_cpu_cores']):>13.2f}"
        )
    if result.get("gateway_profile"):
        print("\nGateway CPU by place (cProfile, own time; start-up included)")
        for row in result["gateway_profile"]:
            print(f"  {100 * row['share']:5.1f}%  {row['where']}")
    print("\nTargets (verdict on the point estimate; 95 % interval in brackets)")
    for row in result["targets"]:
        ci = row.get("ci95")
        interval = f" [{ci[0]:g}, {ci[1]:g}]" if ci else ""
        noise = "" if row.get("resolved") else "  (interval spans the target: not resolved)"
        verdict = "MET   " if row["met"] else "MISSED"
        print(f"  {verdict} {row['target']}: {row['measured']:g}{interval}{noise}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Gateway overhead against calling SGLang directly, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--model",
        choices=["tiny", "bundled"],
        default="tiny",
        help="tiny: random-weight 2-layer Llama (engine time small); bundled: SmolLM2-135M",
    )
    parser.add_argument("--model-path", help="bundled model directory (default: convert it)")
    parser.add_argument(
        "--engine",
        choices=["sglang", "stub"],
        default="sglang",
        help="stub: canned answers instead of a model, to see the gateway's cost alone "
        "(throughput against it means nothing for the target)",
    )
    parser.add_argument(
        "--stub-delay-ms",
        type=float,
        default=0.0,
        help="the stub waits this long before answering, as a model would: the gateway "
        "then runs each latency request cold, as against SGLang",
    )
    parser.add_argument(
        "--stub-token-delay-ms",
        type=float,
        default=0.0,
        help="the stub spaces a stream's token chunks this far apart, as decode steps "
        "would: each chunk then reaches an idle gateway",
    )
    parser.add_argument("--pairs", type=int, default=200, help="latency pairs per mode")
    parser.add_argument("--latency-max-tokens", type=int, default=128)
    parser.add_argument("--warmup-pairs", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per block")
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="rounds per level, each one block per arm back to back (many short rounds "
        "pair the arms closely in time)",
    )
    parser.add_argument("--throughput-max-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--budget-tokens", type=int, default=1024, help="kv_policy budget")
    parser.add_argument(
        "--sleep-on-idle",
        action="store_true",
        help="start SGLang with --sleep-on-idle (its idle scheduler otherwise spins and "
        "holds a core); ignored for the stub",
    )
    parser.add_argument(
        "--pin",
        type=parse_pin,
        metavar="ENGINE_CPUS:GATEWAY_CPUS",
        help="give the engine's processes these CPUs and the gateway and the client the "
        "others (e.g. 0:1); default: everything shares every CPU",
    )
    parser.add_argument(
        "--client-cpus",
        type=parse_cpu_arg,
        metavar="CPUS",
        help="with --pin: run the load client on these CPUs instead of the gateway's "
        "(e.g. the engine's)",
    )
    parser.add_argument(
        "--gateway-profile", type=Path, help="run the gateway under cProfile (CPU time), stats here"
    )
    return parser


@dataclass
class Results:
    """Filled phase by phase; `save` rewrites --out after each, so a killed run keeps
    what it measured."""

    header: dict[str, Any]
    out: Path | None
    latency: dict[str, Any] = field(default_factory=dict)
    latency_cpu: dict[str, Any] = field(default_factory=dict)
    throughput: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self, complete: bool) -> dict[str, Any]:
        return {
            **self.header,
            "complete": complete,
            "latency": self.latency,
            "latency_cpu": self.latency_cpu,
            "throughput": self.throughput,
            "targets": targets(self.latency, self.throughput),
        }

    def save(self, complete: bool = False) -> dict[str, Any]:
        result = self.as_dict(complete)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(self.out)
        return result


async def run_phases(
    args: argparse.Namespace,
    ends: Endpoints,
    meter_for: Callable[[], CpuMeter],
    results: Results,
) -> None:
    latency, cpu, throughput = results.latency, results.latency_cpu, results.throughput
    for mode in args.modes:
        log(f"latency: {mode}, {args.pairs} pairs")
        meter = meter_for().start()
        latency[mode] = await latency_mode(
            ends, mode == "stream", args.pairs, args.latency_max_tokens, args.warmup_pairs
        )
        used = meter.read()
        # Every pair, warm-up included, sends one request through the gateway.
        gateway_requests = args.pairs + args.warmup_pairs
        used["gateway_cpu_ms_per_request"] = 1000 * used["gateway_cpu_s"] / gateway_requests
        cpu[f"latency_{mode}"] = used
        results.save()
    for mode in args.modes:
        for conc in args.concurrency:
            log(f"throughput: {mode}, concurrency {conc}")
            level = await throughput_level(
                ends,
                meter_for,
                mode == "stream",
                conc,
                args.requests,
                args.rounds,
                args.throughput_max_tokens,
            )
            throughput.append({"mode": mode, **level})
            results.save()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.client_cpus is not None and args.pin is None:
        parser.error("--client-cpus needs --pin")
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="gateway-overhead-") as tmp:
        workdir = Path(tmp)
        if args.model_path is None:
            from service.engine.bundled_model import prepare_model

            args.model_path = str(prepare_model().path)
        settings = Settings(model_name=MODEL_NAME, engine_mode="remote")
        kv = {"name": "raas", "budget_tokens": args.budget_tokens, "alpha": 0.1}
        header = {
            "benchmark": "gateway_overhead",
            "started_utc": started.isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "environment": {
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                **{
                    name: package_version(name)
                    for name in (
                        "sglang",
                        "torch",
                        "fastapi",
                        "uvicorn",
                        "uvloop",
                        "httptools",
                        "orjson",
                        "httpx",
                    )
                },
            },
            "config": {
                "engine": args.engine,
                "model": args.model if args.engine == "sglang" else None,
                "stub_delay_ms": args.stub_delay_ms if args.engine == "stub" else None,
                "stub_token_delay_ms": (
                    args.stub_token_delay_ms if args.engine == "stub" else None
                ),
                "prompt": PROMPT,
                "kv_policy": kv,
                "gateway": "separate process (raas-serve serve, remote mode, log level info)",
                "gateway_profiled": args.gateway_profile is not None,
                "pinned": args.pin is not None,
                "client_cpus": sorted(args.client_cpus) if args.client_cpus else None,
            },
        }
        results = Results(header, args.out)
        log(f"starting the engine ({args.engine}, {args.model} model) and the gateway")
        engine_cpus, gateway_cpus = args.pin or (None, None)
        with contextlib.ExitStack() as stack:
            with affinity(engine_cpus):
                engine = stack.enter_context(
                    engine_server(
                        args.engine,
                        args.model,
                        Path(args.model_path),
                        workdir,
                        args.sleep_on_idle,
                        args.stub_delay_ms,
                        args.stub_token_delay_ms,
                    )
                )
            with affinity(gateway_cpus):
                gw, proc = stack.enter_context(
                    gateway_process(engine.url, engine.model, workdir, args.gateway_profile)
                )
            # The load client (this process's main thread, where its event loop runs)
            # sits beside the gateway unless told where.
            stack.enter_context(affinity(args.client_cpus or gateway_cpus))
            results.header["config"]["affinity"] = {
                "engine_tree": tree_affinity(engine.pid),
                "gateway_tree": tree_affinity(proc.pid),
                "client": sorted(os.sched_getaffinity(0)),
            }
            log(f"CPU affinity: {results.header['config']['affinity']}")
            results.header["config"]["engine_flags"] = engine_flags(engine.pid)
            ends = Endpoints(engine.url, gw, kv, settings)

            def meter_for() -> CpuMeter:
                return CpuMeter(proc.pid, engine.pid)

            asyncio.run(run_phases(args, ends, meter_for, results))
    results.header["wall_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    if args.gateway_profile is not None:
        results.header["gateway_profile"] = profile_shares(args.gateway_profile)
    print_report(results.save(complete=True))
    if args.out is not None:
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    raise SystemExit(main())
