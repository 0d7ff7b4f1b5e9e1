"""The load generator against the real gateway in front of a real SGLang on the CPU.

64 concurrent streaming clients for a bounded time, with admission limits far below 64 so
that 429s are expected: no 5xx, every stream ends with [DONE] (or a proper error event),
every 429 is `queue_full` and arrived while at least max_in_flight + max_queue admitted
requests were outstanding, the gateway counted exactly the 429s the clients saw, and the
report (JSON, PNG) is written and well formed. Then the CLI once, end to end.

The engine is the tiny random-weight Llama (`--load-format dummy`) with the raas backend:
speed matters here, and its KV accounting is real. The gateway runs in remote mode in this
process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import httpx
import matplotlib.image
import pytest

from loadtest import LoadConfig, PolicyChoice, run_load
from loadtest.client import RequestRecord
from loadtest.report import Report, write_json, write_png
from tests.support.tiny_gateway import tiny_engine_gateway

pytestmark = pytest.mark.engine

MODEL = "tiny"
MAX_IN_FLIGHT = 8
MAX_QUEUE = 8
CLIENTS = 64
DURATION_S = 20.0
# The gateway frees an admission slot only after it has sent the stream's [DONE] and
# closed the upstream, so a client may see its stream end slightly before the slot is
# free: a request that ended this little before a refused one was sent still counts as
# outstanding for it.
SLOT_RELEASE_SLACK_S = 1.0  # also covers a gateway starved of CPU for a moment
STACK = {
    "model_name": MODEL,
    "max_total_tokens": 16384,
    "max_in_flight": MAX_IN_FLIGHT,
    "max_queue": MAX_QUEUE,
    # Long enough that no request times out in the queue: every 429 is queue_full.
    "queue_timeout_s": 120,
    "retry_after_s": 1,
}
POLICIES = [
    PolicyChoice.parse("raas,budget_tokens=32@2"),
    PolicyChoice.parse("streaming,budget_tokens=32"),
    PolicyChoice.parse("dense"),
]


@pytest.fixture(scope="module")
def gateway(bundled_model_path, tmp_path_factory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("tiny")
    with tiny_engine_gateway(bundled_model_path, workdir, **STACK) as url:
        yield url


def rejections(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("raas_admission_rejections_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def admitted_during(records: list[RequestRecord], refused: RequestRecord) -> int:
    """Admitted requests (in flight or queued: status 200) sent before the refusal arrived
    and not ended before it was sent. Refused requests hold no slot and do not count."""
    return sum(
        1
        for r in records
        if r.status == 200
        and r.start_s < refused.end_s
        and r.end_s > refused.start_s - SLOT_RELEASE_SLACK_S
    )


def test_64_streaming_clients_get_no_5xx_and_429s_only_past_the_admission_limits(gateway, tmp_path):
    before = rejections(gateway)
    config = LoadConfig(
        base_url=gateway,
        model=MODEL,
        concurrency=CLIENTS,
        num_requests=100_000,  # the duration is the bound here
        duration_s=DURATION_S,
        drain_timeout_s=120,
        request_timeout_s=120,
        prompt_set="reasoning",
        max_tokens=64,
        ignore_eos=True,
        policies=POLICIES,
        slo={"ttft_ms": 10_000, "e2el_ms": 30_000},
    )
    result = asyncio.run(run_load(config))
    records = result.records
    assert result.duration_s < DURATION_S + 120

    statuses = {r.status for r in records}
    no_answer = Counter(r.error_code for r in records if r.status is None)
    assert statuses <= {200, 429}, f"statuses: {statuses}, no answer: {no_answer}"
    for r in records:
        if r.status == 200:
            assert r.saw_done, f"stream {r.index} ended without [DONE]: {r.error_code}"
            if r.error_in_stream:
                assert r.error_code and r.error_type, f"malformed error event in {r.index}"
        else:
            assert r.error_code == "queue_full", f"request {r.index}: {r.error_code}"
            assert r.error_type == "rate_limit_error"
            assert r.retry_after_s == 1.0

    ok = [r for r in records if r.success]
    refused = [r for r in records if r.status == 429]
    assert len(ok) >= 2 * MAX_IN_FLIGHT, "too little got through to judge"
    assert refused, f"{CLIENTS} clients against {MAX_IN_FLIGHT}+{MAX_QUEUE} slots met no 429"
    limit = MAX_IN_FLIGHT + MAX_QUEUE
    early = [(r.index, n) for r in refused if (n := admitted_during(records, r)) < limit]
    assert not early, f"429s with fewer than {limit} admitted requests outstanding: {early[:10]}"

    after = rejections(gateway)
    assert after.get("queue_full", 0) - before.get("queue_full", 0) == len(refused)
    assert after.get("queue_timeout", 0) == before.get("queue_timeout", 0)

    report = Report.build(result)
    summary = report.summary
    assert summary.outcomes == {"ok": len(ok), "429": len(refused)}
    assert summary.ttft.count == len(ok) and summary.e2e.p99_ms is not None
    assert summary.tpot.count == len(ok)  # 64 tokens each, ignore_eos
    assert summary.goodput is not None and summary.goodput.good_requests <= len(ok)
    # KV savings as the gateway reported them: budgets of 32 tokens against 64-token
    # decodes evict, dense keeps everything.
    kv = summary.kv.savings_ratio_by_policy
    assert kv["raas/32"] is not None and kv["raas/32"] > 0
    assert kv["streaming/32"] is not None and kv["streaming/32"] > 0
    assert kv["dense"] == 0.0
    assert summary.kv.total.requests_reported == len(ok)

    data = json.loads(write_json(report, tmp_path / "run.json").read_text())
    assert data["summary"]["sent"] == len(data["requests"]) == len(records)
    assert sum(data["summary"]["outcomes"].values()) == len(records)
    assert data["timeline"][-1]["cumulative_dense_tokens"] == (
        summary.kv.total.dense_equivalent_tokens
    )
    image = matplotlib.image.imread(write_png(report, tmp_path / "run.png"))
    assert image.shape[0] > 200 and image.shape[1] > 600


def test_cli_runs_end_to_end_and_writes_its_reports(gateway, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "loadtest",
        "--base-url", gateway, "--model", MODEL,
        "--num-requests", "12", "--concurrency", "4", "--duration", "60",
        "--max-tokens", "16", "--ignore-eos",
        "--policy", "raas,budget_tokens=32", "--policy", "dense",
        "--slo-ttft-ms", "10000", "--output-dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TTFT" in proc.stdout and "KV saved" in proc.stdout
    data = json.loads((out / "loadtest.json").read_text())
    assert data["summary"]["outcomes"] == {"ok": 12}
    assert data["summary"]["total_output_tokens"] == 12 * 16
    assert data["summary"]["goodput"]["slos_ms"] == {"ttft": 10000.0}
    assert (out / "loadtest.png").read_bytes()[:4] == b"\x89PNG"

    remote = subprocess.run(
        [sys.executable, "-m", "loadtest", "--base-url", "http://192.0.2.1:8000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert remote.returncode == 2 and "loopback" in remote.stderr
