"""The CPU decode benchmark's bookkeeping without an engine: token windows, the engine
CPU-time measure, and ratios computed per measure (the engine run is
tests/test_bench_cpu_smoke.py's business)."""

from __future__ import annotations

import os
import threading
import time

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


def test_engine_cpu_counts_this_process_and_its_exited_threads(bench):
    # The window's CPU must include threads that ended inside it (SGLang's and uvicorn's
    # worker threads come and go), and must resolve less than a 10 ms tick.
    burned: list[float] = []

    def burn() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.005:
            pass
        burned.append(time.thread_time() - start)

    before = bench.engine_cpu_s(os.getpid())
    worker = threading.Thread(target=burn)
    worker.start()
    worker.join()
    used = bench.engine_cpu_s(os.getpid()) - before
    assert burned[0] <= used < burned[0] + 1.0


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
    # The ceiling is dense's own slowdown from the first checkpoint past the budget (48)
    # to here; at 48 itself there is no earlier dense window to compare with.
    assert wall["1"]["checkpoints"]["96"]["ratio_ceiling"] == {"raas_32": 1.25}
    assert cpu["1"]["checkpoints"]["96"]["ratio_ceiling"] == {"raas_32": 1.25}
    assert "ratio_ceiling" not in wall["1"]["checkpoints"]["48"]
    # A window without a CPU figure is left out of that measure only.
    runs[1].checkpoints["48"] = point(bench, 10, None)
    assert (
        "raas_32"
        not in bench.summarize(runs, [32], [plan], "tok_per_engine_cpu_s")["1"]["checkpoints"][
            "48"
        ]["tok_s"]
    )


def test_repeats_alternate_the_order_of_the_arms(bench):
    arms = (
        bench.Arm("dense", "raas", "dense"),
        bench.Arm("raas_32", "raas", "raas", 32),
        bench.Arm("torch_native", "torch_native", None),
    )
    plans = [bench.LevelPlan(1, 96, (96,), arms), bench.LevelPlan(2, 96, (96,), arms[:2])]
    order = [(p.concurrency, a.name, r) for p, a, r in bench.run_order(plans, "raas", 3)]
    assert order == [
        (1, "dense", 0),
        (1, "raas_32", 0),
        (1, "raas_32", 1),
        (1, "dense", 1),
        (1, "dense", 2),
        (1, "raas_32", 2),
        (2, "dense", 0),
        (2, "raas_32", 0),
        (2, "raas_32", 1),
        (2, "dense", 1),
        (2, "dense", 2),
        (2, "raas_32", 2),
    ]
    assert [a.name for _, a, _ in bench.run_order(plans, "torch_native", 2)] == [
        "torch_native",
        "torch_native",
    ]
    with pytest.raises(SystemExit, match="repeats"):
        bench.make_plans(bench.build_parser().parse_args(["--out", "x.json", "--repeats", "0"]))


def test_summary_over_repeats_is_the_geometric_mean_with_each_pass_kept(bench):
    plan = bench.LevelPlan(
        1,
        96,
        (96,),
        (bench.Arm("dense", "raas", "dense"), bench.Arm("raas_32", "raas", "raas", 32)),
    )

    def run(arm, budget, tok_s, repeat, foreign):
        p = point(bench, tok_s, tok_s / 2)
        p.foreign_cpu_cores = foreign
        return bench.RunResult(
            arm, "raas", arm.split("_")[0], budget, 1, 96, 10, 1.0, 1.0, {"96": p}, 0.0, repeat
        )

    runs = [
        run("dense", None, 4.0, 0, 0.1),
        run("raas_32", 32, 16.0, 0, 0.0),
        run("raas_32", 32, 9.0, 1, 0.3),
        run("dense", None, 9.0, 1, 0.0),
    ]
    row = bench.summarize(runs, [32], [plan])["1"]["checkpoints"]["96"]
    assert row["tok_s"]["dense"] == pytest.approx(6.0)
    assert row["tok_s"]["raas_32"] == pytest.approx(12.0)
    assert row["ratio_vs_dense"]["raas_32"] == pytest.approx(2.0)
    assert row["tok_s_each"] == {"dense": [4.0, 9.0], "raas_32": [16.0, 9.0]}
    assert row["ratio_vs_dense_each"]["raas_32"] == pytest.approx([4.0, 1.0])
    assert row["foreign_cpu_cores"] == {"dense": 0.1, "raas_32": 0.3}
    # One pass: no per-pass lists.
    single = bench.summarize(runs[:2], [32], [plan])["1"]["checkpoints"]["96"]
    assert "tok_s_each" not in single and single["ratio_vs_dense"]["raas_32"] == 4.0
