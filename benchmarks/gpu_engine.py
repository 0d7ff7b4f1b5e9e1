"""SGLang with `--attention-backend raas` against stock FlashInfer SGLang, end to end.

Both engines run the same model on the same GPU, CUDA graphs on in both, one after the
other in one run, and every figure is a ratio of two measurements taken here. Stages
(``--stages``, comma-separated):

- ``correctness`` (real weights): greedy outputs of stock and raas with a budget above
  the generation length, token for token, at batch 1 and batch 32; at a divergence, the
  stock top-2 logit margin at that step says whether it is a near tie. Then raas with a
  budget below the length: each request's peak retained KV stays within prompt +
  budget + one page, and SGLang's own used-token count within the sum of those bounds.
- ``leak`` (raas only, SGLang's page-invariant and busy-time leak checks on): a few
  hundred mixed-policy requests, a fifth of them cut mid-stream (aborts); afterwards
  the pool holds nothing and its free count equals its capacity.
- ``speed``: 32 requests decode from a short prompt to ``--max-context`` tokens
  (ignore_eos); time per output token around given contexts, raas (budget
  ``--budget``) over stock. The first window lies before the budget is reached.
- ``memory``: the KV pool dense needs for ``--dense-fit`` concurrent generations of
  ``--memory-output`` tokens; many such requests at once for ``--memory-seconds``;
  peak running requests and output tokens/s, raas over stock.

Usage on a GPU host with SGLang and FlashInfer (docs/gpu.md has the offline recipe)::

    python benchmarks/gpu_engine.py --model /models/SmolLM2 --stages correctness,leak \\
        --out results.json
    python benchmarks/gpu_engine.py --model /models/llama8b-shape --load-format dummy \\
        --stages speed,memory --out results.json

It needs only the standard library (HTTP, threads), so it runs where SGLang runs. On a
CPU machine ``--stock-backend torch_native --device cpu`` dry-runs every stage small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 16


def log(msg: str) -> None:
    print(f"[gpu_engine {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- server -------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _post(url: str, body: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def sglang(
    args: argparse.Namespace,
    backend: str,
    log_dir: Path,
    *,
    model: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    tag: str = "",
) -> Iterator[Server]:
    port = args.port
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", model,
        "--attention-backend", backend,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-metrics",
        "--sampling-backend", "pytorch",
        "--disable-radix-cache",
        "--context-length", str(args.context_length),
        "--mem-fraction-static", str(args.mem_fraction),
        "--dtype", args.dtype,
    ]  # fmt: skip
    if args.device != "cuda":
        cmd += ["--device", args.device, "--disable-cuda-graph"]
    if args.load_format:
        cmd += ["--load-format", args.load_format]
    if args.cuda_graph_max_bs and args.device == "cuda":
        cmd += ["--cuda-graph-max-bs-decode", str(args.cuda_graph_max_bs)]
    if backend == "raas":
        cmd += ["--disable-overlap-schedule"]
    cmd += extra or []
    log_path = log_dir / f"server-{backend}{tag}.log"
    log(f"start {backend}{tag}: {' '.join(cmd[3:])}")
    t0 = time.monotonic()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-6000:]
                raise RuntimeError(f"{backend} server exited ({proc.returncode}):\n{tail}")
            if time.monotonic() - t0 > args.start_timeout:
                raise RuntimeError(f"{backend} server not ready in {args.start_timeout} s")
            try:
                _get(f"{url}/health_generate", timeout=5)
                break
            except (urllib.error.URLError, OSError, TimeoutError):
                time.sleep(2)
        log(f"{backend}{tag} ready in {time.monotonic() - t0:.0f} s")
        yield Server(url, proc, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def metric(url: str, name: str) -> float | None:
    text = _get(f"{url}/metrics", timeout=10).decode()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"sglang:{name}{{") or line.startswith(f"sglang:{name} ")
    ]
    return sum(values) if values else None


def policy(name: str, budget: int) -> dict[str, Any]:
    return {"custom_params": {"kv_policy": {"name": name, "budget_tokens": budget}}}


# -- requests ------------------------------------------------------------------------------


def generate(url: str, body: dict[str, Any]) -> dict[str, Any]:
    return _post(f"{url}/generate", body)


def generate_many(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[Any] = [None] * len(bodies)

    def one(i: int) -> None:
        try:
            out[i] = generate(url, bodies[i])
        except Exception as exc:  # reported per request
            out[i] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@dataclass
class StreamTrace:
    """(monotonic time, completion tokens) at each streamed chunk."""

    points: list[tuple[float, int]] = field(default_factory=list)
    error: str | None = None


def stream(
    url: str, body: dict[str, Any], trace: StreamTrace, stop: threading.Event | None = None
) -> None:
    body = {**body, "stream": True}
    req = urllib.request.Request(
        f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            for raw in resp:
                if stop is not None and stop.is_set():
                    return  # closing the connection aborts the request
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    meta = json.loads(line[6:])["meta_info"]
                    trace.points.append((time.monotonic(), int(meta["completion_tokens"])))
    except Exception as exc:
        trace.error = f"{type(exc).__name__}: {exc}"


def sampled(input_ids: list[int], max_new: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A greedy generation of exactly max_new tokens (ignore_eos)."""
    params = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0.0, **extra}
    return {"input_ids": input_ids, "sampling_params": params}


def stream_threads(
    url: str, bodies: list[dict[str, Any]], stop: threading.Event | None = None
) -> tuple[list[StreamTrace], list[threading.Thread]]:
    """One (not yet started) streaming thread and its trace per body."""
    traces = [StreamTrace() for _ in bodies]
    threads = [
        threading.Thread(target=stream, args=(url, b, tr, stop))
        for b, tr in zip(bodies, traces, strict=True)
    ]
    return traces, threads


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


# -- stages --------------------------------------------------------------------------------

TEXTS = [
    "Explain why the sky is blue in three sentences.",
    "Write a short poem about a lighthouse keeper.",
    "List five prime numbers and say why each is prime.",
    "What is the capital of France, and what is it known for?",
    "Describe how a bicycle works to a child.",
    "Summarize the plot of a detective story you invent.",
    "Give step-by-step instructions to boil an egg.",
    "Why do cats purr? Give two hypotheses.",
]


def greedy_bodies(n: int, max_new: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "text": f"Question {i}: {TEXTS[i % len(TEXTS)]}",
            "sampling_params": {
                "temperature": 0.0,
                "max_new_tokens": max_new,
                "ignore_eos": True,
                **extra,
            },
            "return_logprob": True,
            "top_logprobs_num": 2,
        }
        for i in range(n)
    ]


def compare(stock: list[dict], ours: list[dict]) -> dict[str, Any]:
    """Token equality per request; the stock top-2 margin at each first divergence."""
    equal, diverged = 0, []
    for i, (a, b) in enumerate(zip(stock, ours, strict=True)):
        if "error" in a or "error" in b:
            diverged.append({"request": i, "error": a.get("error") or b.get("error")})
            continue
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        if ids_a == ids_b:
            equal += 1
            continue
        step = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), None)
        margin = None
        tops = a["meta_info"].get("output_top_logprobs") or []
        if step is not None and step < len(tops) and tops[step] and len(tops[step]) >= 2:
            margin = tops[step][0][0] - tops[step][1][0]
        diverged.append({"request": i, "step": step, "stock_top2_margin": margin})
    return {"requests": len(stock), "equal": equal, "diverged": diverged}


def stage_correctness(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    n_new = args.correct_tokens
    big = policy("raas", max(512, 4 * n_new))
    res: dict[str, Any] = {}
    outs: dict[str, dict[str, list]] = {}
    for backend, extra in ((args.stock_backend, {}), ("raas", big)):
        with sglang(args, backend, log_dir, model=args.model) as srv:
            one = [generate(srv.url, greedy_bodies(1, n_new, extra)[0])]
            many = generate_many(srv.url, greedy_bodies(args.batch, n_new, extra))
            outs[backend] = {"b1": one, "b32": many}
            if backend == "raas":
                res["bounded"] = bounded_kv(srv.url, n_new, args.batch)
    for key in ("b1", "b32"):  # b32: --batch requests at once
        res[key] = compare(outs[args.stock_backend][key], outs["raas"][key])
        log(f"greedy {key}: {res[key]['equal']}/{res[key]['requests']} equal; "
            f"diverged {res[key]['diverged'][:4]}")  # fmt: skip
    return res


def bounded_kv(url: str, n_new: int, batch: int) -> dict[str, Any]:
    """raas below the generation length: per-request and pool-wide KV bounds."""
    budget = 2 * PAGE
    bodies = greedy_bodies(batch, 4 * n_new, policy("raas", budget))
    for b in bodies:
        b.pop("return_logprob")
        b.pop("top_logprobs_num")
    peak_used = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_used
        while not done.is_set():
            with contextlib.suppress(Exception):
                peak_used = max(peak_used, metric(url, "num_used_tokens") or 0.0)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outs = generate_many(url, bodies)
    done.set()
    sampler.join()
    over, bound_sum = [], 0
    for o in outs:
        if "error" in o:
            over.append(o["error"])
            continue
        prompt = o["meta_info"]["prompt_tokens"]
        kv = o["meta_info"].get("raas_kv_cache") or {}
        bound = prompt + budget + PAGE
        bound_sum += bound + 1
        if kv.get("peak_retained_tokens", bound + 1) > bound:
            over.append({"prompt": prompt, "kv": kv})
    res = {
        "budget": budget,
        "requests": len(outs),
        "over_bound": over[:5],
        "peak_used_tokens": peak_used,
        "sum_of_bounds": bound_sum,
        "pool_within_bounds": peak_used <= bound_sum,
    }
    log(f"bounded KV: {len(over)} over; SGLang peak used {peak_used:.0f} <= {bound_sum}")
    return res


def stage_leak(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    env = {
        "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    }
    policies = [
        {"name": "raas", "budget_tokens": 32},
        {"name": "raas", "budget_tokens": 48, "alpha": 0.0, "refresh_top_fraction": 0.25},
        {"name": "streaming", "budget_tokens": 32},
        {"name": "h2o", "budget_tokens": 64, "recent_tokens": 16},
        {"name": "dense"},
    ]
    with sglang(args, "raas", log_dir, model=args.model, env=env, tag="-leak") as srv:
        capacity = (metric(srv.url, "kv_available_tokens") or 0) + (
            metric(srv.url, "num_used_tokens") or 0
        )
        errors: list[str] = []
        aborted = 0
        lock = threading.Lock()

        def worker(k: int) -> None:
            nonlocal aborted
            for i in range(k, args.leak_requests, 16):
                params = {
                    "max_new_tokens": 40 + (i * 7) % 90,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "custom_params": {"kv_policy": policies[i % len(policies)]},
                }
                body = {"input_ids": list(range(100, 110 + i % 40)), "sampling_params": params}
                if i % 5 == 0:
                    params["max_new_tokens"] = 160
                    stop = threading.Event()
                    trace = StreamTrace()
                    cut = (3, 45, 100)[(i // 5) % 3]
                    th = threading.Thread(target=stream, args=(srv.url, body, trace, stop))
                    th.start()
                    while th.is_alive() and (not trace.points or trace.points[-1][1] < cut):
                        time.sleep(0.005)
                    stop.set()
                    th.join()
                    with lock:
                        aborted += 1
                    continue
                try:
                    out = generate(srv.url, body)
                    if len(out["output_ids"]) != params["max_new_tokens"]:
                        errors.append(f"{len(out['output_ids'])} tokens")
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric(srv.url, "num_used_tokens"):
            time.sleep(0.5)
        used = metric(srv.url, "num_used_tokens")
        avail = metric(srv.url, "kv_available_tokens")
        log_text = srv.log_path.read_text(errors="replace")
    res = {
        "requests": args.leak_requests,
        "aborted": aborted,
        "errors": errors[:5],
        "used_after": used,
        "available_after": avail,
        "capacity": capacity,
        "pool_whole": used == 0 and avail == capacity,
        "log_errors": [
            line for line in log_text.splitlines() if "Traceback" in line or "leak" in line.lower()
        ][:5],
    }
    log(f"leak: {res}")
    return res


def _window_tpot(trace: StreamTrace, lo: int, hi: int) -> float | None:
    """Seconds per token between the chunks where completion tokens first reach lo, hi."""
    t_lo = next(((t, n) for t, n in trace.points if n >= lo), None)
    t_hi = next(((t, n) for t, n in trace.points if n >= hi), None)
    if t_lo is None or t_hi is None or t_hi[1] <= t_lo[1]:
        return None
    return (t_hi[0] - t_lo[0]) / (t_hi[1] - t_lo[1])


def each_backend(args: argparse.Namespace, run_one: Any) -> dict[str, Any]:
    """run_one(backend) for stock and raas; one failing does not stop the other."""
    out: dict[str, Any] = {}
    order = ("raas", args.stock_backend) if args.raas_first else (args.stock_backend, "raas")
    for backend in order:
        try:
            out[backend] = run_one(backend)
        except Exception as exc:
            out[backend] = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
        log(f"{backend}: {str(out[backend])[:3000]}")
    return out


def stage_speed(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    windows = [(c - args.window, c) for c in args.contexts]
    early = (args.budget // 2, args.budget - 2 * args.prompt_len)
    windows = [early, *windows]
    ids = prompts(args.batch, args.prompt_len, 1, args.vocab)

    def one(backend: str) -> dict[str, Any]:
        extra = policy("raas", args.budget) if backend == "raas" else {}
        flags = ["--stream-interval", "32"]
        with sglang(args, backend, log_dir, model=args.model, extra=flags) as srv:
            bodies = [sampled(p, args.max_context - args.prompt_len, extra) for p in ids]
            traces, threads = stream_threads(srv.url, bodies)
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
        per_window = {}
        for lo, hi in windows:
            lo_n, hi_n = lo - args.prompt_len, hi - args.prompt_len
            vals = [v for tr in traces if (v := _window_tpot(tr, lo_n, hi_n))]
            per_window[f"{lo}-{hi}"] = statistics.median(vals) * 1e3 if vals else None
        errors = [tr.error for tr in traces if tr.error]
        return {"tpot_ms": per_window, "wall_s": wall, "errors": errors[:3]}

    res: dict[str, Any] = {"windows": windows, "batch": args.batch, "budget": args.budget}
    res.update(each_backend(args, one))
    s, r = res[args.stock_backend].get("tpot_ms", {}), res["raas"].get("tpot_ms", {})
    res["ratio_stock_over_raas"] = {k: (s[k] / r[k] if s.get(k) and r.get(k) else None) for k in r}
    log(f"speed ratios (stock TPOT / raas TPOT): {res['ratio_stock_over_raas']}")
    return res


def stage_memory(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    pool = args.dense_fit * (args.memory_prompt + args.memory_output + PAGE)
    ids = prompts(args.memory_requests, args.memory_prompt, 2, args.vocab)

    def one(backend: str) -> dict[str, Any]:
        extra = policy("raas", args.budget) if backend == "raas" else {}
        flags = ["--max-total-tokens", str(pool), "--max-running-requests", "256",
                 "--stream-interval", "32"]  # fmt: skip
        with sglang(args, backend, log_dir, model=args.model, extra=flags) as srv:
            stop = threading.Event()
            bodies = [sampled(p, args.memory_output, extra) for p in ids]
            traces, threads = stream_threads(srv.url, bodies, stop)
            for t in threads:
                t.start()
            peak_running = 0.0
            t_start = time.monotonic()
            while time.monotonic() - t_start < args.memory_seconds:
                with contextlib.suppress(Exception):
                    peak_running = max(peak_running, metric(srv.url, "num_running_reqs") or 0.0)
                time.sleep(1.0)
            t_end = time.monotonic()
            stop.set()
            for t in threads:
                t.join(timeout=30)
        # Tokens produced inside [t_start + warm, t_end]: steady state, not the ramp.
        lo = t_start + args.memory_seconds * 0.25

        def tokens_at(tr: StreamTrace, when: float) -> int:
            return max((n for t, n in tr.points if t <= when), default=0)

        produced = sum(tokens_at(tr, t_end) - tokens_at(tr, lo) for tr in traces)
        return {
            "peak_running": peak_running,
            "output_tok_s": produced / (t_end - lo),
            "errors": [tr.error for tr in traces if tr.error][:3],
        }

    res: dict[str, Any] = {"pool_tokens": pool, "requests": args.memory_requests}
    res.update(each_backend(args, one))
    s, r = res[args.stock_backend], res["raas"]
    if s.get("peak_running") and r.get("peak_running"):
        res["concurrency_ratio"] = r["peak_running"] / s["peak_running"]
    if s.get("output_tok_s") and r.get("output_tok_s"):
        res["throughput_ratio"] = r["output_tok_s"] / s["output_tok_s"]
    log(
        f"memory ratios: concurrency x{res.get('concurrency_ratio')}, "
        f"tokens/s x{res.get('throughput_ratio')}"
    )
    return res


STAGES = {
    "correctness": stage_correctness,
    "leak": stage_leak,
    "speed": stage_speed,
    "memory": stage_memory,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="")
    p.add_argument("--stages", default="correctness,leak")
    p.add_argument("--stock-backend", default="flashinfer")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--context-length", type=int, default=40960)
    p.add_argument("--mem-fraction", type=float, default=0.85)
    p.add_argument("--cuda-graph-max-bs", type=int, default=64)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--vocab", type=int, default=49152, help="prompt ids drawn below this")
    p.add_argument("--correct-tokens", type=int, default=128)
    p.add_argument("--leak-requests", type=int, default=320)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-context", type=int, default=32768)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dense-fit", type=int, default=8)
    p.add_argument("--memory-prompt", type=int, default=1024)
    p.add_argument("--memory-output", type=int, default=32768)
    p.add_argument("--memory-requests", type=int, default=128)
    p.add_argument("--memory-seconds", type=float, default=60)
    p.add_argument("--raas-first", action="store_true", help="run raas before stock")
    p.add_argument("--out", default="gpu_engine.json")
    p.add_argument("--log-dir", default="gpu_engine_logs")
    args = p.parse_args(argv)
    # A `timeout` or an operator's SIGTERM must still stop the engines (they run in their
    # own sessions): exit through the context managers' clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", [])
    run: dict[str, Any] = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(Exception):
        import sglang as _sg
        import torch

        run["versions"] = {"sglang": _sg.__version__, "torch": torch.__version__}
        if torch.cuda.is_available():
            run["device"] = torch.cuda.get_device_name(0)
    rc = 0
    for name in args.stages.split(","):
        try:
            run[name] = STAGES[name](args, log_dir)
        except Exception as exc:
            log(f"stage {name} failed: {type(exc).__name__}: {str(exc)[-3000:]}")
            run[name] = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
            rc = 1
        results["runs"] = [*results["runs"], run]
        out.write_text(json.dumps(results, indent=1))
        results["runs"] = results["runs"][:-1]
    results["runs"].append(run)
    out.write_text(json.dumps(results, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
