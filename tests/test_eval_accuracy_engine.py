"""raas-eval end to end: a few bundled problems through `raas-serve serve` (gateway plus its
embedded SGLang on the CPU, the bundled model) for dense and raas at the smallest budget.

Bounded: 4 problems x 2 policy points at 64 output tokens. What it checks is the plumbing
a user relies on: every request answered and graded, usage.kv_cache read back (raas held
prompt + budget where dense held everything), the results and plot written, and a rerun
into the same directory sends nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from eval.accuracy import cli
from eval.accuracy.problem_generator import BUNDLED
from tests.support.embedded_gateway import Served, embedded_gateway

pytestmark = pytest.mark.engine

BUDGET = 32


@pytest.fixture(scope="module")
def gateway(bundled_model_path, tmp_path_factory) -> Iterator[Served]:
    with embedded_gateway(bundled_model_path, tmp_path_factory.mktemp("eval-gw")) as srv:
        yield srv


def test_raas_eval_through_the_real_gateway_and_engine(gateway, tmp_path: Path):
    out = tmp_path / "eval"
    argv = [
        "--problems", str(BUNDLED), "--limit", "4", "--seed", "3",
        "--base-url", f"{gateway.url}/v1", "--out", str(out),
        "--policies", "dense", "raas", "--budgets", str(BUDGET),
        "--max-tokens", "64", "--concurrency", "4", "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0, gateway.logs()

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for r in records:
        kv, prompt, completion = r["kv_cache"], r["prompt_tokens"], r["completion_tokens"]
        assert kv["dense_equivalent_tokens"] == prompt + completion - 1
        if r["policy"] == "dense":
            assert kv["peak_retained_tokens"] == kv["dense_equivalent_tokens"]
        elif completion > BUDGET + 1:
            # Once the budget's worth of decode tokens is written, raas holds no more.
            assert kv["peak_retained_tokens"] == prompt + BUDGET
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["results"]}
    assert set(rows) == {"dense", f"raas@{BUDGET}"}
    raas = rows[f"raas@{BUDGET}"]
    assert raas["answered"] == 4 and raas["vs_baseline"]["pairs"] == 4
    if any(r["completion_tokens"] > BUDGET + 1 for r in records if r["policy"] == "raas"):
        assert raas["kv"]["saved_fraction"] > 0
    assert rows["dense"]["kv"]["saved_fraction"] == 0
    assert (out / "accuracy_vs_kv.png").stat().st_size > 1000

    # Resumed: everything already answered, nothing is sent again.
    assert cli.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["requests_this_run"] == 0 and again["results"] == results["results"]
