"""The CPU decode benchmark end to end at toy sizes: it runs and writes well-formed results.

No timing assertions: the figures of a 96-token run on a shared 2-core machine mean
nothing; only their presence and sign are checked.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.support.bench_script import load_benchmark, positive, run_benchmark

pytestmark = pytest.mark.engine

CONCURRENCY = (1, 2)
BUDGET = 32
MAX_LEN = 96
WINDOW = 16
ARMS = {"dense", "raas_nobudget", f"raas_{BUDGET}"}


@pytest.fixture(scope="module")
def results(tmp_path_factory, bundled_model_path) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "cpu_decode.json"
    argv = [
        "--model-path",
        str(bundled_model_path),
        "--max-len",
        str(MAX_LEN),
        "--window",
        str(WINDOW),
        "--budgets",
        str(BUDGET),
        "--concurrency",
        *map(str, CONCURRENCY),
        # No waiting for a quiet machine: nothing is timed here.
        "--quiet-wait-s",
        "0",
    ]
    return run_benchmark("cpu_decode", out, argv)


def test_help_runs_without_an_engine(capsys):
    bench = load_benchmark("cpu_decode")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "--max-len" in capsys.readouterr().out


def test_results_have_every_arm_and_level(results):
    data, _ = results
    assert data["complete"] is True
    for key in ("environment", "config", "engines", "runs", "summary", "started_utc"):
        assert key in data
    assert data["environment"]["sglang"] and data["environment"]["torch"]
    assert data["config"]["dtype"] == "bfloat16"
    assert positive(data["engines"]["raas"]["max_total_num_tokens"])
    seen = {(r["concurrency"], r["arm"]) for r in data["runs"]}
    assert seen == {(c, arm) for c in CONCURRENCY for arm in ARMS}


def test_runs_report_positive_rates(results):
    data, _ = results
    for run in data["runs"]:
        assert run["max_len"] == MAX_LEN
        assert positive(run["wall_s"]) and positive(run["mean_tok_s"])
        assert run["prompt_tokens"] > 0
        assert run["foreign_cpu_cores"] >= 0
        assert set(run["checkpoints"]) == {"48", "96"}
        for point in run["checkpoints"].values():
            assert positive(point["tok_s"]) and positive(point["per_request_tok_s"])
            assert positive(point["tok_per_engine_cpu_s"])


@pytest.mark.parametrize("summary", ["summary", "summary_engine_cpu"])
def test_summary_has_ratios_and_overheads(results, summary):
    data, table = results
    for conc in CONCURRENCY:
        block = data[summary][str(conc)]
        assert block["max_len"] == MAX_LEN
        for row in block["checkpoints"].values():
            assert set(row["tok_s"]) == ARMS
            assert all(positive(v) for v in row["tok_s"].values())
            assert set(row["ratio_vs_dense"]) == ARMS - {"dense"}
            assert all(positive(v) for v in row["ratio_vs_dense"].values())
            # The never-reached arm is below budget everywhere; raas_32 at no checkpoint.
            overhead = row["overhead_pct_vs_dense"]
            assert set(overhead) == {"raas_nobudget"}
            assert math.isfinite(overhead["raas_nobudget"])
        ceiling = block["checkpoints"]["96"]["ratio_ceiling"]
        assert set(ceiling) == {f"raas_{BUDGET}"} and positive(ceiling[f"raas_{BUDGET}"])
        assert "ratio_ceiling" not in block["checkpoints"]["48"]
        flat = block["flat_after_budget"][f"raas_{BUDGET}"]
        assert flat["checkpoints"] == [48, 96]
        assert positive(flat["min_over_max"]) and flat["min_over_max"] <= 1
    assert f"raas_{BUDGET}/dense" in table
    assert "overhead % vs dense" in table
    assert f"raas_{BUDGET} at 96: ceiling" in table
    assert "tokens per engine CPU-second" in table
