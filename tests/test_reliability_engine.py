"""Reliability of the running service, on one engine: soak, fuzzing, then faults.

`raas-serve serve` (embedded mode, its own process, as in production) supervises SGLang
on a tiny random-weight model (fast; its scheduler, KV pool and raas page accounting are
the real ones), with SGLang's KV page-invariant and busy leak checks switched on. One
engine serves the whole module (on this machine the engine lock is the scarce resource),
in this order:

- soak: RAAS_SOAK_REQUESTS (500; `make soak` 3000) random requests from eight openai
  clients, mixed policies and budgets, one in ten dropped mid-stream: the KV pool is
  whole again, no leak or invariant error is logged, the gateway has nothing in flight
  and its memory stayed flat after warm-up;
- fuzzing: schemathesis over the gateway's OpenAPI schema, no 5xx;
- faults: a stalled engine gives 504 (an error event when streaming) and an abort that
  frees its KV; the engine killed under open streams gives each an error event, the
  supervisor restarts it and the same gateway serves again; SIGTERM drains in-flight
  requests, refuses new ones with 503, exits 0 and leaves no SGLang process behind.

docs/reliability.md records the figures.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.embedded_gateway import Served, tiny_embedded_gateway
from tests.support.gateway_server import wait_ready
from tests.support.metrics_text import gateway_metric
from tests.support.sglang_server import START_TIMEOUT_S, assert_engine_log_clean, descendants
from tests.test_gateway_engine import LONG, MODEL, client, gateway, wait_for
from tests.test_raas_engine import metric

pytestmark = pytest.mark.engine

# The pool tests/test_raas_leak_engine.py runs the same SGLang invariant checks with.
CAPACITY = 4096
REQUESTS = int(os.environ.get("RAAS_SOAK_REQUESTS", "500"))
CLIENTS = 8
DISCONNECT_SHARE = 0.1
# Gateway RSS may grow this much from the first quarter of the soak to the last.
RSS_GROWTH_LIMIT = 30 * 2**20
WORDS = ["keeper", "storm", "ship", "lamp", "night", "sea", "rock", "gull", "wave", "tide"]
FUZZ_EXAMPLES = int(os.environ.get("RAAS_FUZZ_EXAMPLES", "40"))
FUZZ_SEED = os.environ.get("RAAS_FUZZ_SEED", "7")
REPO = Path(__file__).resolve().parents[1]
# The tiny model decodes a few hundred tokens/s alone: 1000 tokens take seconds.
MANY = 1000
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def served(bundled_model_path, tmp_path_factory) -> Iterator[Served]:
    env = {
        "RAAS_ENGINE_MAX_TOTAL_TOKENS": str(CAPACITY),
        "RAAS_DRAIN_TIMEOUT_S": "60",
        "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    }
    workdir = tmp_path_factory.mktemp("reliability")
    with tiny_embedded_gateway(Path(bundled_model_path), workdir, env) as srv:
        yield srv


def kv_freed(engine: str) -> bool:
    return metric(engine, "num_used_tokens") == 0 and metric(engine, "num_running_reqs") == 0


def scheduler_pid(served: Served) -> int:
    for pid in descendants(served.engine_pid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sglang::scheduler"):
                return pid
    raise LookupError("no SGLang scheduler process found")


@contextlib.contextmanager
def stalled(pid: int) -> Iterator[None]:
    """The engine accepts HTTP but produces nothing: its scheduler is frozen."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def open_stream(url: str, max_tokens: int = MANY) -> Iterator[Any]:
    stream = client(url, timeout=60).chat.completions.create(
        model=MODEL,
        messages=LONG,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = iter(stream)
    next(chunks)  # admitted and decoding
    return chunks


def stream_error(chunks: Iterator[Any]) -> dict[str, Any]:
    """Read on until the stream fails; its error event becomes an openai.APIError."""
    with pytest.raises(openai.APIError) as exc:
        for _ in chunks:
            pass
    assert isinstance(exc.value.body, dict), exc.value
    return exc.value.body


def random_policy(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(["raas", "dense", "streaming", "h2o", "quest"])
    if name == "dense":
        return {"name": "dense"}
    # Budgets at or below the decode length, so that eviction runs on most requests.
    policy: dict[str, Any] = {"name": name, "budget_tokens": rng.randrange(32, 97)}
    if name == "h2o":
        policy["recent_tokens"] = rng.randrange(0, policy["budget_tokens"] - 15)
    if name == "raas" and rng.random() < 0.3:
        policy["refresh_top_fraction"] = 0.25
    return policy


@dataclass
class Tally:
    done: int = 0
    disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    policies: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(api: Any, rng: random.Random, tally: Tally) -> None:
    policy = random_policy(rng)
    disconnect = rng.random() < DISCONNECT_SHARE
    # A dropped stream is long enough that the drop lands mid-stream.
    max_tokens = rng.randrange(48 if disconnect else 8, 97)
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 60)))
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "extra_body": {"kv_policy": policy, "ignore_eos": True},
    }
    if disconnect or rng.random() < 0.5:
        stream = api.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        if disconnect:
            chunks = iter(stream)
            next(chunks)
            next(chunks)
            stream.close()
        else:
            usage = [c for c in stream if c.usage][-1].usage
    else:
        usage = api.chat.completions.create(**kwargs).usage
    with tally.lock:
        tally.policies[policy["name"]] += 1
        if disconnect:
            tally.disconnected += 1
        elif usage.completion_tokens != max_tokens or usage.kv_cache["policy"] != policy["name"]:
            tally.errors.append(f"{policy} {max_tokens}: {usage}")
        tally.done += 1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError("no VmRSS")


# --- soak ---------------------------------------------------------------------------


def test_soak_mixed_policies_and_disconnects_leak_nothing(served):
    engine, gw = served.engine_url, served.url
    capacity = metric(engine, "kv_available_tokens") + metric(engine, "num_used_tokens")
    tally = Tally()
    samples: list[tuple[int, int]] = []  # (requests done, gateway RSS)
    next_index = iter(range(REQUESTS))
    index_lock = threading.Lock()
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        api = client(gw, timeout=60)
        while True:
            with index_lock:
                if next(next_index, None) is None:
                    return
            try:
                one_request(api, rng, tally)
            except Exception as exc:  # keep soaking; the failures are asserted at the end
                with tally.lock:
                    tally.errors.append(repr(exc))
                    tally.done += 1

    def sampler() -> None:
        while not stop.wait(0.25):
            samples.append((tally.done, rss_bytes(served.process.pid)))

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
    watcher = threading.Thread(target=sampler)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    stop.set()
    watcher.join()
    seconds = time.monotonic() - started
    assert tally.done == REQUESTS
    assert not tally.errors, tally.errors[:5]
    assert tally.disconnected >= REQUESTS * DISCONNECT_SHARE / 2

    wait_for(lambda: metric(engine, "num_used_tokens") == 0, 30)
    assert metric(engine, "kv_available_tokens") == capacity
    assert metric(engine, "num_running_reqs") == 0
    assert gateway_metric(gw, "raas_requests_in_flight") == 0
    assert gateway_metric(gw, "raas_requests_queued") == 0
    outcomes = {
        name: gateway_metric(gw, "raas_chat_requests_total", outcome=name)
        for name in ("success", "client_disconnected")
    }
    assert outcomes["success"] + outcomes["client_disconnected"] == REQUESTS, outcomes
    # A drop can race the stream's last token; nearly all must reach the engine as aborts.
    assert outcomes["client_disconnected"] >= 0.9 * tally.disconnected, outcomes

    assert_engine_log_clean(served.engine_log_path)

    quarter = REQUESTS // 4
    first = [rss for done, rss in samples if done <= quarter]
    last = [rss for done, rss in samples if done >= REQUESTS - quarter]
    growth = statistics.median(last) - statistics.median(first)
    print(
        f"\nsoak: {REQUESTS} requests in {seconds:.0f} s ({REQUESTS / seconds:.1f}/s), "
        f"{tally.disconnected} dropped by the client, policies {dict(tally.policies)}, "
        f"gateway RSS median first quarter {statistics.median(first) / 2**20:.1f} MiB, "
        f"last quarter {statistics.median(last) / 2**20:.1f} MiB, "
        f"max {max(rss for _, rss in samples) / 2**20:.1f} MiB"
    )
    assert growth < RSS_GROWTH_LIMIT, f"gateway RSS grew {growth / 2**20:.1f} MiB"


# --- fuzzing ------------------------------------------------------------------------


def fuzz(url: str, workdir: Path) -> str:
    """Schemathesis's command line, as an operator would run it; returns its report."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{url}/openapi.json"]
    cmd += ["--checks", "not_a_server_error", "--max-examples", str(FUZZ_EXAMPLES)]
    cmd += ["--seed", FUZZ_SEED, "--generation-database", "none", "--workers", "1"]
    cmd += ["--request-timeout", "60"]
    env = {
        **os.environ,
        # Most generated chat bodies name the served model, so they get past the 404.
        "SCHEMATHESIS_HOOKS": "tests.support.fuzz_hooks",
        "RAAS_FUZZ_MODEL": MODEL,
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=workdir)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    return report


def test_fuzzing_the_openapi_schema_finds_no_server_error(served, tmp_path):
    engine_pid = served.engine_pid()
    # A gateway whose valid requests decode briefly: fuzzing is about inputs. The engine
    # is up throughout, so any 5xx, 503 and 504 included, is a bug.
    with gateway(served.engine_url, max_tokens_limit=16, default_max_tokens=8) as url:
        report = fuzz(url, tmp_path)
        generated = re.search(r"(\d+) generated", report)
        assert generated and int(generated.group(1)) >= 5 * FUZZ_EXAMPLES, report[-3000:]
        print(f"\nfuzz: {generated.group(0)} test cases, seed {FUZZ_SEED}, no server error")
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
        wait_for(lambda: gateway_metric(url, "raas_requests_in_flight") == 0, 30)
        # The gateway still serves a valid request end to end after the fuzzing.
        ok = client(url, timeout=60).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert ok.choices[0].finish_reason in ("length", "stop")
        assert gateway_metric(url, "raas_chat_requests_total", outcome="success") >= 1
    assert served.engine_pid() == engine_pid
    assert httpx.get(f"{served.url}/health/ready").json()["engine_restarts"] == 0
    wait_for(lambda: kv_freed(served.engine_url), 30)


# --- faults (the last one stops the gateway) ------------------------------------------


def test_stalled_engine_is_504_then_an_abort_frees_its_kv(served):
    engine = served.engine_url
    aborted = metric(engine, "num_aborted_requests_total", default=0.0)
    with gateway(engine, upstream_timeout_s=1.0) as url:
        # Non-streaming: the whole answer takes longer than the upstream timeout.
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(
                model=MODEL, messages=LONG, max_tokens=MANY, extra_body=IGNORE_EOS
            )
        assert exc.value.status_code == 504
        assert exc.value.body["code"] == "upstream_timeout"
        assert exc.value.body["type"] == "server_error"
        # Far short of the ~1000-token answer (tens of seconds here), with room for a
        # client starved of CPU on a shared machine.
        assert time.monotonic() - started < 20
        wait_for(lambda: kv_freed(engine), 10)

        # Streaming: chunks flow, then the engine goes silent past the timeout.
        chunks = open_stream(url)
        with stalled(scheduler_pid(served)):
            started = time.monotonic()
            body = stream_error(chunks)
            waited = time.monotonic() - started
        assert body["code"] == "upstream_timeout", body
        # The clock starts after the freeze, so a starved client reads less than the
        # 1 s timeout; the error code says which timer fired.
        assert waited < 20
        wait_for(lambda: kv_freed(engine), 10)
    assert metric(engine, "num_aborted_requests_total") >= aborted + 2
    assert httpx.get(f"{served.url}/health/ready").status_code == 200


def test_engine_killed_mid_stream_errors_every_stream_then_recovers(served):
    gateway_pid = served.process.pid
    streams = [open_stream(served.url) for _ in range(3)]
    os.killpg(served.engine_pid(), signal.SIGKILL)
    for chunks in streams:
        assert stream_error(chunks)["code"] == "engine_unavailable"
    wait_for(lambda: httpx.get(f"{served.url}/health/ready").status_code == 503, 30)
    wait_for(lambda: gateway_metric(served.url, "raas_requests_in_flight") == 0, 30)

    try:
        wait_ready(served.url, timeout_s=START_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(served.logs()) from exc
    resp = client(served.url).chat.completions.create(
        model=MODEL, messages=LONG, max_tokens=8, extra_body=IGNORE_EOS
    )
    assert resp.usage.completion_tokens == 8
    assert served.process.pid == gateway_pid and served.process.poll() is None
    assert httpx.get(f"{served.url}/health/ready").json()["engine_restarts"] == 1


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(served):
    family = descendants(served.process.pid)
    results: dict[str, int] = {}
    failures: list[BaseException] = []

    def run_stream(name: str) -> None:
        try:
            chunks = open_stream(served.url, max_tokens=800)
            results[name] = [c for c in chunks if c.usage][-1].usage.completion_tokens
        except BaseException as exc:
            failures.append(exc)

    def run_plain() -> None:
        try:
            resp = client(served.url, timeout=120).chat.completions.create(
                model=MODEL, messages=LONG, max_tokens=800, extra_body=IGNORE_EOS
            )
            results["plain"] = resp.usage.completion_tokens
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run_stream, args=(f"s{i}",)) for i in range(2)]
    threads.append(threading.Thread(target=run_plain))
    for t in threads:
        t.start()
    wait_for(lambda: gateway_metric(served.url, "raas_requests_in_flight") == 3, 30)

    served.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{served.url}/health/ready").status_code == 503, 30)
    assert httpx.get(f"{served.url}/health/ready").json()["status"] == "draining"
    with pytest.raises(openai.InternalServerError) as exc:
        client(served.url).chat.completions.create(model=MODEL, messages=LONG, max_tokens=4)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "shutting_down"
    assert exc.value.response.headers["retry-after"] == "1"
    assert any(t.is_alive() for t in threads), "requests finished before the drain was seen"

    for t in threads:
        t.join(120)
    assert not failures, failures
    assert results == {"s0": 800, "s1": 800, "plain": 800}
    assert served.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while alive := [pid for pid in family if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"orphaned engine processes: {alive}"
        time.sleep(0.2)
    log = served.log_path.read_text()
    for event in ("gateway.draining", "gateway.drained", "engine.stopped", "gateway.stopped"):
        assert event in log, event
