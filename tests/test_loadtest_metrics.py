"""Load generator metrics, config and schedule on known inputs (no server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from loadtest.client import RequestRecord
from loadtest.config import LoadConfig, PolicyChoice, Slo
from loadtest.metrics import distribution, goodput, kv_savings, summarize, timeline, tpot_s
from loadtest.report import Report, report_json, write_png
from loadtest.runner import RunResult
from loadtest.schedule import plan_requests, poisson_arrivals


def ok(
    index: int,
    start: float,
    ttft: float,
    itl: list[float],
    tokens: int,
    *,
    policy: str = "raas/32",
    kv: tuple[int, int, int] | None = None,
    prompt_tokens: int = 10,
) -> RequestRecord:
    end = start + ttft + sum(itl)
    kv_cache = None
    if kv is not None:
        kv_cache = {
            "policy": policy.split("/")[0],
            "peak_retained_tokens": kv[0],
            "dense_equivalent_tokens": kv[1],
            "evicted_pages": kv[2],
        }
    return RequestRecord(
        index=index,
        policy=policy,
        start_s=start,
        end_s=end,
        status=200,
        ttft_s=ttft,
        itl_s=itl,
        content_chunks=len(itl) + 1,
        prompt_tokens=prompt_tokens,
        completion_tokens=tokens,
        kv_cache=kv_cache,
        saw_done=True,
    )


def refused(index: int, status: int, code: str) -> RequestRecord:
    return RequestRecord(
        index=index, policy="dense", start_s=0.0, end_s=0.01, status=status, error_code=code
    )


def test_distribution_uses_linear_percentiles_in_ms():
    d = distribution([0.001 * v for v in range(1, 11)])  # 1..10 ms
    assert d.count == 10
    assert d.mean_ms == pytest.approx(5.5)
    assert d.p50_ms == pytest.approx(5.5)
    assert d.p90_ms == pytest.approx(9.1)
    assert d.p99_ms == pytest.approx(9.91)
    assert d.max_ms == pytest.approx(10.0)
    empty = distribution([])
    assert empty.count == 0 and empty.p99_ms is None


def test_tpot_excludes_the_first_token_and_one_token_answers():
    r = ok(0, 0.0, 0.5, [0.1, 0.2, 0.3], tokens=4)
    assert r.latency_s == pytest.approx(1.1)
    assert tpot_s(r) == pytest.approx(0.2)  # (1.1 - 0.5) / 3
    assert tpot_s(ok(1, 0.0, 0.5, [], tokens=1)) is None


def test_summary_counts_outcomes_and_throughput_over_the_whole_run():
    records = [
        ok(0, 0.0, 0.1, [0.1] * 9, tokens=10, kv=(32, 100, 4)),
        ok(1, 1.0, 0.3, [0.2] * 4, tokens=5, policy="dense", kv=(40, 40, 0)),
        refused(2, 429, "queue_full"),
        refused(3, 429, "queue_full"),
        RequestRecord(
            index=4,
            policy="dense",
            status=200,
            error_code="upstream_timeout",
            error_in_stream=True,
            saw_done=True,
        ),
        RequestRecord(index=5, policy="dense", error_code="transport_error"),
    ]
    s = summarize(records, duration_s=4.0, slo=Slo())
    assert (s.sent, s.completed, s.failed) == (6, 2, 4)
    assert s.outcomes == {"ok": 2, "429": 2, "stream_error": 1, "transport_error": 1}
    assert s.errors_by_code == {"queue_full": 2, "upstream_timeout": 1, "transport_error": 1}
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_throughput == pytest.approx(15 / 4)
    assert s.total_throughput == pytest.approx(35 / 4)
    assert s.ttft.p50_ms == pytest.approx(200.0)
    assert s.itl.count == 13
    assert s.e2e.mean_ms == pytest.approx((1.0 + 1.1) / 2 * 1000)
    assert s.mean_concurrency == pytest.approx(2.1 / 4)
    assert s.goodput is None
    assert s.completed_by_policy == {"raas/32": 1, "dense": 1}


def test_goodput_needs_every_slo_and_divides_attainment_by_all_sent():
    records = [
        ok(0, 0.0, 0.1, [0.05] * 10, tokens=11),  # ttft 100, tpot 50, e2e 600
        ok(1, 0.0, 0.4, [0.05] * 10, tokens=11),  # ttft too slow
        ok(2, 0.0, 0.1, [0.2] * 10, tokens=11),  # tpot too slow
        ok(3, 0.0, 0.1, [], tokens=1),  # one token: tpot counts as 0
        refused(4, 429, "queue_full"),
    ]
    g = goodput(records, Slo(ttft_ms=200, tpot_ms=100), duration_s=2.0)
    assert g is not None
    assert g.good_requests == 2
    assert g.request_goodput == pytest.approx(1.0)
    assert g.slo_attainment == pytest.approx(2 / 5)
    assert g.slo_attainment_by_metric == {
        "ttft": pytest.approx(3 / 5),
        "tpot": pytest.approx(3 / 5),
    }
    assert goodput(records, Slo(), 2.0) is None


def test_kv_savings_sum_what_the_server_reported_by_policy():
    records = [
        ok(0, 0.0, 0.1, [0.1], tokens=2, kv=(32, 128, 6)),
        ok(1, 0.0, 0.1, [0.1], tokens=2, kv=(48, 64, 1)),
        ok(2, 0.0, 0.1, [0.1], tokens=2, policy="dense", kv=(80, 80, 0)),
        ok(3, 0.0, 0.1, [0.1], tokens=2, policy="dense"),  # no usage.kv_cache
    ]
    records[3].kv_cache = {"peak_retained_tokens": None, "dense_equivalent_tokens": None}
    kv = kv_savings(records)
    assert kv.total.requests_reported == 3
    assert kv.total.peak_retained_tokens == 160
    assert kv.total.dense_equivalent_tokens == 272
    assert kv.total.evicted_pages == 7
    assert kv.savings_ratio == pytest.approx(1 - 160 / 272)
    assert kv.savings_ratio_by_policy == {"raas/32": pytest.approx(1 - 80 / 192), "dense": 0.0}


def test_timeline_windows_latency_and_accumulates_kv():
    records = [
        ok(0, 0.0, 0.2, [0.3], tokens=2, kv=(10, 20, 1)),  # ends 0.5
        ok(1, 0.0, 0.4, [0.4], tokens=2, kv=(10, 40, 2)),  # ends 0.8
        ok(2, 1.0, 0.1, [0.4], tokens=2, kv=(5, 5, 0)),  # ends 1.5
    ]
    points = timeline(records, window_s=1.0)
    assert [p.requests for p in points] == [2, 1]
    assert points[0].e2e_p50_ms == pytest.approx(650.0)
    assert [p.cumulative_dense_tokens for p in points] == [60, 65]
    assert [p.cumulative_retained_tokens for p in points] == [20, 25]


def test_report_json_and_png_are_written(tmp_path):
    config = LoadConfig(slo=Slo(ttft_ms=500), api_key="sk-secret")
    records = [ok(i, 0.1 * i, 0.1, [0.05] * 5, tokens=6, kv=(32, 64, 2)) for i in range(8)]
    report = Report.build(RunResult(config, "2026-01-01T00:00:00+00:00", 2.0, records))
    data = json.loads(json.dumps(report_json(report)))
    assert data["config"]["api_key"] == "***"
    assert data["summary"]["completed"] == 8
    assert len(data["requests"]) == 8 and data["requests"][0]["outcome"] == "ok"
    png = write_png(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_specs_parse_like_the_header_syntax():
    assert PolicyChoice.parse("default").kv_policy is None
    c = PolicyChoice.parse("raas,budget_tokens=256,alpha=0.1@3")
    assert c.kv_policy == {"name": "raas", "budget_tokens": 256, "alpha": 0.1}
    assert c.weight == 3.0 and c.label == "raas/256"
    assert PolicyChoice.parse("name=dense").label == "dense"
    with pytest.raises(ValueError, match="key=value"):
        PolicyChoice.parse("raas,256")


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8000", "http://example.com", "http://[2001:db8::1]:80"]
)
def test_config_refuses_remote_targets_unless_allowed(url):
    with pytest.raises(ValidationError, match="loopback"):
        LoadConfig(base_url=url)
    assert LoadConfig(base_url=url, allow_remote=True).base_url == url


@pytest.mark.parametrize(
    ("url", "chat"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://localhost:1/", "http://localhost:1/v1/chat/completions"),
        ("http://[::1]:9", "http://[::1]:9/v1/chat/completions"),
    ],
)
def test_config_accepts_loopback_targets(url, chat):
    assert LoadConfig(base_url=url).chat_url == chat


def test_config_needs_a_rate_for_open_loop_and_a_known_prompt_set():
    with pytest.raises(ValidationError, match="request_rate"):
        LoadConfig(mode="open")
    with pytest.raises(ValidationError, match="reasoning"):
        LoadConfig(prompt_set="no-such-set")


def test_plan_is_seeded_and_follows_policy_weights():
    config = LoadConfig(
        num_requests=2000,
        policies=[PolicyChoice.parse("raas@3"), PolicyChoice.parse("dense@1")],
        seed=7,
    )
    plan = plan_requests(config, num_prompts=5)
    assert plan == plan_requests(config, num_prompts=5)
    share = sum(p.policy_index == 0 for p in plan) / len(plan)
    assert share == pytest.approx(0.75, abs=0.03)
    assert {p.prompt_index for p in plan} == set(range(5))


def test_poisson_arrivals_have_the_requested_rate():
    times = poisson_arrivals(rate=20.0, count=5000, seed=1)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert (len(times) - 1) / times[-1] == pytest.approx(20.0, rel=0.05)
    assert math.isclose(times[-1], poisson_arrivals(20.0, 5000, 1)[-1])
