"""The CPU decode benchmark's bookkeeping without an engine: token windows, the engine
CPU-time measure, and ratios computed per measure (the engine run is
tests/test_bench_cpu_smoke.py's business)."""

from __future__ import annotations

import os

import pytest

from tests.support.bench_script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cpu_decode")


def point(bench, tok_s: float, per_cpu_s: float | None):
    return bench.CheckpointResult(
        tok_s=tok_s,
        per_request_tok_s=tok_s,
        kv_used_tokens=None,
        foreign_cpu_cores=0.0,
        tok_per_engine_cpu_s=per_cpu_s,
    )


def test_cpu_window_counts_tokens_of_every_request_inside_it(bench):
    a, b = bench.StreamTrace(), bench.StreamTrace()
    for n in range(1, 101):
        a.record(n, float(n))
        b.record(n, n + 0.5)
    window = bench.CpuWindow(start=10.0, end=20.0, engine_cpu_s=5.0)
    assert window.tokens([a]) == 10  # tokens 11..20
    assert window.tokens([a, b]) == 20  # b's 10.5..19.5


def test_engine_jiffies_reads_this_process(bench):
    before = bench.engine_jiffies(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert bench.engine_jiffies(os.getpid()) > before


def test_summary_per_measure(bench):
    plan = bench.LevelPlan(
        1,
        96,
        (48, 96),
        (bench.Arm("dense", "raas", "dense"), bench.Arm("raas_32", "raas", "raas", 32)),
    )

    def run(arm, budget, points):
        return bench.RunResult(arm, "raas", arm.split("_")[0], budget, 1, 96, 10, 1.0, 1.0, points)

    runs = [
        run("dense", None, {"48": point(bench, 10, 5), "96": point(bench, 8, 4)}),
        run("raas_32", 32, {"48": point(bench, 10, 5), "96": point(bench, 10, 6)}),
    ]
    wall = bench.summarize(runs, [32], [plan])
    cpu = bench.summarize(runs, [32], [plan], measure="tok_per_engine_cpu_s")
    assert wall["1"]["checkpoints"]["96"]["ratio_vs_dense"] == {"raas_32": 1.25}
    assert cpu["1"]["checkpoints"]["96"]["ratio_vs_dense"] == {"raas_32": 1.5}
    assert cpu["1"]["flat_after_budget"]["raas_32"]["min_over_max"] == pytest.approx(5 / 6)
    # A window without a CPU figure is left out of that measure only.
    runs[1].checkpoints["48"] = point(bench, 10, None)
    assert (
        "raas_32"
        not in bench.summarize(runs, [32], [plan], "tok_per_engine_cpu_s")["1"]["checkpoints"][
            "48"
        ]["tok_s"]
    )
