"""The gateway overhead benchmark end to end at toy sizes: it runs and writes well-formed
results.

The real gateway runs in its own process as in the full run; the engine is the stub
(benchmarks/stub_engine.py), so the test needs no SGLang start and takes seconds. The
SGLang path differs only in which server `engine_server` starts.

No timing assertions: figures from a handful of requests on a shared 2-core machine mean
nothing; only their presence and shape are checked (the targets are judged by the full
run recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.support.bench_script import finite, positive, run_benchmark

CONCURRENCY = 2
REQUESTS = 6
# With two CPUs the run is pinned as a deployment would be: engine on one, gateway and
# client on the other.
CPUS = sorted(os.sched_getaffinity(0))
PIN = (CPUS[0], CPUS[1]) if len(CPUS) >= 2 else None
MODES = ("nonstream", "stream")
# The stub answers after this wait, as a model would: the latency loop's gateway runs cold.
STUB_DELAY_MS = 20
# ... and spaces a stream's chunks this far apart, as decode steps would.
STUB_TOKEN_DELAY_MS = 2
LATENCY_TOKENS = 8
ARMS = ("direct", "gateway")


def assert_quantiles(q: dict[str, Any], *, signed: bool = False) -> None:
    assert set(q) == {"p50", "p90", "p99", "mean"}
    check = finite if signed else positive
    assert all(check(v) for v in q.values()), q
    assert q["p50"] <= q["p90"] <= q["p99"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, bundled_model_path) -> tuple[dict[str, Any], str]:
    # The bundled model directory only feeds the gateway's config.json read.
    out = tmp_path_factory.mktemp("bench") / "gateway_overhead.json"
    argv = [
        "--model-path",
        str(bundled_model_path),
        "--pairs",
        "4",
        "--warmup-pairs",
        "1",
        "--concurrency",
        str(CONCURRENCY),
        "--requests",
        str(REQUESTS),
        "--engine",
        "stub",
        "--rounds",
        "1",
        "--stub-delay-ms",
        str(STUB_DELAY_MS),
        "--stub-token-delay-ms",
        str(STUB_TOKEN_DELAY_MS),
        "--latency-max-tokens",
        str(LATENCY_TOKENS),
    ]
    if PIN is not None:
        argv += ["--pin", f"{PIN[0]}:{PIN[1]}"]
    return run_benchmark("gateway_overhead", out, argv)


def test_latency_has_both_arms_and_the_overhead(results):
    data, _ = results
    assert data["complete"] is True
    assert data["config"]["engine"] == "stub"
    assert data["config"]["stub_delay_ms"] == STUB_DELAY_MS
    assert data["config"]["stub_token_delay_ms"] == STUB_TOKEN_DELAY_MS
    assert data["environment"]["sglang"] and data["environment"]["fastapi"]
    assert set(data["latency"]) == set(MODES)
    for mode, res in data["latency"].items():
        assert res["pairs"] == 4
        for arm in ARMS:
            assert_quantiles(res["e2e_ms"][arm])
            # Both arms wait out the stub's delays: the options reach the stub.
            waits = STUB_DELAY_MS
            if mode == "stream":
                waits += (LATENCY_TOKENS - 1) * STUB_TOKEN_DELAY_MS
            assert res["e2e_ms"][arm]["p50"] >= waits
        assert positive(data["latency_cpu"][f"latency_{mode}"]["gateway_cpu_ms_per_request"])
        assert_quantiles(res["overhead_e2e_ms"], signed=True)
        assert len(res["overhead_e2e_pairs_ms"]) == 4
        lo, hi = res["overhead_e2e_p50_ci95_ms"]
        assert lo <= res["overhead_e2e_ms"]["p50"] <= hi
        if mode == "stream":
            for arm in ARMS:
                assert_quantiles(res["ttft_ms"][arm])
            assert_quantiles(res["overhead_ttft_ms"], signed=True)
        else:
            assert "ttft_ms" not in res


def test_pinning_reaches_every_process_of_each_side(results):
    data, _ = results
    affinity = data["config"]["affinity"]
    # The engine's options are recorded too (the stub's are uvicorn's).
    assert "--port" in data["config"]["engine_flags"]
    if PIN is None:
        assert data["config"]["pinned"] is False
        pytest.skip("one CPU: nothing to pin apart")
    assert data["config"]["pinned"] is True
    assert affinity == {"engine_tree": [PIN[0]], "gateway_tree": [PIN[1]], "client": [PIN[1]]}
    assert data["config"]["client_cpus"] is None


def test_throughput_blocks_and_ratios(results):
    data, _ = results
    assert [(lvl["mode"], lvl["concurrency"]) for lvl in data["throughput"]] == [
        (mode, CONCURRENCY) for mode in MODES
    ]
    for lvl in data["throughput"]:
        assert sorted(b["arm"] for b in lvl["blocks"]) == sorted(ARMS)
        for block in lvl["blocks"]:
            assert block["requests"] == REQUESTS
            assert block["output_tokens"] == REQUESTS * lvl["max_tokens"]
            assert positive(block["wall_s"]) and block["foreign_cpu_cores"] >= 0
        for arm in ARMS:
            assert positive(lvl["arms"][arm]["requests_per_s"])
            assert positive(lvl["arms"][arm]["output_tokens_per_s"])
        # The gateway process serves the gateway blocks, and only they cost it real CPU.
        assert positive(lvl["arms"]["gateway"]["gateway_cpu_ms_per_request"])
        assert positive(lvl["ratio_requests_per_s"]) and positive(lvl["ratio_output_tokens_per_s"])
        # One round: one paired ratio, which is the paired estimate; no interval from one.
        assert len(lvl["paired_ratios"]) == lvl["rounds"] == 1
        assert lvl["ratio_paired"] == pytest.approx(lvl["paired_ratios"][0])
        assert lvl["ratio_paired_ci95"] is None


def test_targets_are_judged_and_printed(results):
    data, table = results
    assert len(data["targets"]) == len(data["latency"]) + len(data["throughput"])
    for row in data["targets"]:
        assert isinstance(row["met"], bool) and finite(row["measured"])
        assert isinstance(row["resolved"], bool)
        assert row["target"] in table
    assert "gw/direct" in table
