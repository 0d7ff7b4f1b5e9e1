"""The gateway A/B benchmark end to end at toy sizes: both builds start from their own
source trees, take alternating requests, and the results are well formed.

The engine is the stub (no SGLang start; seconds). No timing assertions: a handful of
requests on a shared machine says nothing about which build is cheaper; only the
presence and shape of the figures are checked.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from tests.support.bench_script import finite, positive, run_benchmark

CPUS = sorted(os.sched_getaffinity(0))
PIN = f"{CPUS[0]}:{CPUS[1]}" if len(CPUS) >= 2 else None
PAIRS = 4
STUB_DELAY_MS = 10
STUB_TOKEN_DELAY_MS = 3
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory, bundled_model_path) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "gateway_ab.json"
    argv = ["--base", "HEAD", "--pairs", str(PAIRS), "--warmup-pairs", "1"]
    argv += ["--stub-delay-ms", str(STUB_DELAY_MS), "--max-tokens", str(MAX_TOKENS)]
    argv += ["--stub-token-delay-ms", str(STUB_TOKEN_DELAY_MS)]
    if PIN is not None:
        # The client apart from the gateways, beside the stub.
        argv += ["--pin", PIN, "--client-cpus", str(CPUS[0])]
    return run_benchmark("gateway_ab", out, argv)


def test_builds_are_named_by_commit(results):
    data, _ = results
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert data["base"] == head
    assert data["candidate"].startswith(head)


def test_each_mode_has_both_builds_and_their_difference(results):
    data, table = results
    assert set(data["modes"]) == {"nonstream", "stream"}
    for mode, figures in data["modes"].items():
        assert figures["pairs"] == PAIRS
        metrics = ("e2e_ms", "ttft_ms") if mode == "stream" else ("e2e_ms",)
        assert set(metrics) <= set(figures)
        for metric in metrics:
            m = figures[metric]
            for arm in ("base", "candidate"):
                assert positive(m[arm]["p50"]) and m[arm]["p50"] <= m[arm]["p99"]
            # The stub's delays reach it: a stream's e2e waits out every chunk's.
            if metric == "e2e_ms" and mode == "stream":
                waits = STUB_DELAY_MS + (MAX_TOKENS - 1) * STUB_TOKEN_DELAY_MS
                assert all(m[arm]["p50"] >= waits for arm in ("base", "candidate"))
            assert finite(m["difference_ms"]["p50"])
            low, high = m["difference_p50_ci95_ms"]
            assert low <= high
        cpu = figures["gateway_cpu_ms_per_request"]
        assert positive(cpu["base"]) and positive(cpu["candidate"])
        assert positive(figures["cpu_ratio_candidate_over_base"])
        assert f"{mode:10} cpu ms/request" in table


def test_pinning_puts_both_gateways_together_and_the_client_where_asked(results):
    data, _ = results
    if PIN is None:
        pytest.skip("one CPU: nothing to pin apart")
    affinity = data["config"]["affinity"]
    assert affinity["engine_tree"] == [CPUS[0]]
    assert affinity["base_tree"] == affinity["candidate_tree"] == [CPUS[1]]
    assert affinity["client"] == data["config"]["client_cpus"] == [CPUS[0]]
