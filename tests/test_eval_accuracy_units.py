"""raas-eval without an engine: answer extraction and checking, problem loading, the
statistics, the policy grid, records and resume, and the CLI end to end against a fake
OpenAI-compatible endpoint (429 with Retry-After, a 400, usage.kv_cache)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from eval.accuracy import cli
from eval.accuracy.answers import check_answer, extract_answer, last_boxed, normalize
from eval.accuracy.policy_grid import PolicyPoint, build_grid
from eval.accuracy.problem_generator import BUNDLED, DEFAULT_COUNT, DEFAULT_SEED, generate
from eval.accuracy.problems import load_problems, parse_line
from eval.accuracy.records import Signature, SignatureMismatch, check_signature, read_records
from eval.accuracy.runner import select_problems
from eval.accuracy.statistics import mcnemar_exact_p, paired_against, wilson_interval
from eval.accuracy.summary import summarize
from tests.support.gateway_server import serve_app

# --- extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "method"),
    [
        ("so \\boxed{3} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        ("nested \\boxed{\\sqrt{2}+{1}} end", "\\sqrt{2}+{1}", "boxed"),
        ("work\n#### 1,234\n", "1,234", "hashes"),
        ("3 apples and 4 more make 7.", "7", "last_number"),
        ("It is -2.5 degrees.", "-2.5", "last_number"),
        ("ratio 3/4", "3/4", "last_number"),
    ],
)
def test_extract_answer_prefers_boxed_then_hashes_then_last_number(text, expected, method):
    got = extract_answer(text)
    assert got is not None
    assert (got.text, got.method) == (expected, method)


def test_unclosed_box_falls_back_and_no_number_is_no_answer():
    assert last_boxed("\\boxed{12") is None
    got = extract_answer("the answer is 5 so \\boxed{12")
    assert got is not None and (got.text, got.method) == ("12", "last_number")
    assert extract_answer("I do not know.") is None


# --- checking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "reference", "method"),
    [
        ("$42$", "42", "exact"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", "exact"),
        ("1,000", "1000", "exact"),
        ("0.5", "\\frac{1}{2}", "numeric"),
        ("1/3", "0.3333333333", "numeric"),
        ("42.0", "42", "numeric"),
        ("2\\sqrt{2}", "\\sqrt{8}", "symbolic"),
        ("\\frac{\\pi}{2}", "\\pi/2", "symbolic"),
    ],
)
def test_equal_answers_match(predicted, reference, method):
    verdict = check_answer(predicted, reference)
    assert verdict.correct and verdict.method == method


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [("41", "42"), ("0.5", "\\frac{1}{3}"), ("\\sqrt{3}", "\\sqrt{2}"), ("x+", "2")],
)
def test_different_answers_do_not_match(predicted, reference):
    assert not check_answer(predicted, reference).correct


def test_numeric_tolerance_is_a_parameter():
    assert not check_answer("3.14", "3.14159").correct
    assert check_answer("3.14", "3.14159", rel_tol=1e-3).correct


def test_normalize_drops_formatting_only():
    assert normalize("$\\left( 1, 2 \\right)$.") == "(1,2)"
    assert normalize("10\\text{ cm}") == "10cm"


# --- loading ----------------------------------------------------------------------------


def test_layouts_are_detected_and_bad_lines_reported_without_stopping(tmp_path):
    lines = [
        json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}),
        json.dumps(
            {"problem": "half?", "solution": "It is \\boxed{\\frac12}.", "unique_id": "m/1"}
        ),
        json.dumps({"problem": "x?", "answer": "\\sqrt{2}", "solution": "ignored"}),
        json.dumps({"id": "aime-1", "problem": "n?", "answer": 7}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"question": "no answer here"}),
        json.dumps({"problem": "p", "solution": "no box"}),
        json.dumps({"id": "aime-2", "problem": "n?", "answer": None}),
        "",
        json.dumps({"id": "aime-1", "problem": "again", "answer": 3}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_problems(path)
    got = [(p.id, p.layout, p.answer) for p in loaded.problems]
    assert got == [
        ("line-1", "gsm8k", "2"),
        ("m/1", "math", "\\frac12"),
        ("line-3", "math", "\\sqrt{2}"),
        ("aime-1", "aime", "7"),
    ]
    issues = {i.line: i.reason for i in loaded.issues}
    assert sorted(issues) == [5, 6, 7, 8, 9, 11]
    assert issues[5].startswith("not JSON")
    assert "JSON object" in issues[6]
    assert "no known layout" in issues[7]
    assert "no closed \\boxed{}" in issues[8]
    assert "missing field 'answer'" in issues[9]
    assert "duplicate id" in issues[11]


def test_forced_layout_names_the_missing_field():
    issue = parse_line(json.dumps({"problem": "p", "answer": "1"}), 3, "gsm8k")
    assert not hasattr(issue, "question") and "'question'" in issue.reason  # type: ignore[union-attr]


def test_aime_answers_are_integers_without_leading_zeros():
    problem = parse_line(json.dumps({"question": "q", "answer": "033"}), 1, "aime")
    assert problem.answer == "33"  # type: ignore[union-attr]
    issue = parse_line(json.dumps({"question": "q", "answer": "seven"}), 2, "aime")
    assert "not an integer" in issue.reason  # type: ignore[union-attr]


def test_bundled_problem_set_is_what_the_generator_writes():
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    assert rows == generate(DEFAULT_COUNT, DEFAULT_SEED)
    loaded = load_problems(BUNDLED)
    assert not loaded.issues and len(loaded.problems) == DEFAULT_COUNT
    for p in loaded.problems:  # every worked solution ends in its own answer
        assert p.answer == re.findall(r"-?\d+", p.question + " = " + p.answer)[-1]


def test_seeded_sample_is_repeatable_and_keeps_file_order(tmp_path):
    problems = load_problems(BUNDLED).problems
    a, b = select_problems(problems, 10, 5), select_problems(problems, 10, 5)
    assert a == b and len(a) == 10
    assert [problems.index(p) for p in a] == sorted(problems.index(p) for p in a)
    assert select_problems(problems, 10, 6) != a


# --- statistics -------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="expected 0 <= correct <= total"):
        wilson_interval(3, 2)


def test_mcnemar_exact():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(3, 3) == 1.0


def test_paired_comparison_names_the_flips():
    dense = {"a": True, "b": True, "c": False, "d": False, "e": True}
    policy = {"a": True, "b": False, "c": True, "d": False}  # e failed: not a pair
    paired = paired_against(dense, policy)
    assert (paired.pairs, paired.both_correct, paired.both_wrong) == (4, 1, 1)
    assert (paired.lost, paired.gained) == (["b"], ["c"])
    assert paired.accuracy_delta == 0


# --- grid -------------------------------------------------------------------------------


def test_grid_puts_the_baseline_first_and_checks_budgets():
    grid = build_grid(["raas", "dense", "streaming"], [64, 32], {"raas": {"alpha": 0.1}})
    assert [p.label for p in grid] == [
        "dense",
        "raas@32",
        "raas@64",
        "streaming@32",
        "streaming@64",
    ]
    assert grid[1].kv_policy() == {"name": "raas", "budget_tokens": 32, "alpha": 0.1}
    assert grid[0].kv_policy() == {"name": "dense"}
    assert PolicyPoint("none").kv_policy() is None
    with pytest.raises(ValueError, match="at least 32"):
        build_grid(["raas"], [16])
    with pytest.raises(ValueError, match="expected a policy"):
        build_grid(["lru"], [32])
    with pytest.raises(ValueError, match="need at least one budget"):
        build_grid(["raas"], [])


# --- summary ----------------------------------------------------------------------------


def _record(pid: str, label: str, correct: bool, kv: dict[str, int] | None, **kw: Any):
    name, _, budget = label.partition("@")
    return {
        "problem_id": pid,
        "label": label,
        "policy": name,
        "status": "ok",
        "correct": correct,
        "extracted": "1",
        "completion_tokens": 100,
        "kv_cache": kv,
        **kw,
    }


def test_summary_accuracy_pairs_and_kv_saved():
    grid = build_grid(["dense", "raas"], [32])
    dense_kv = {"peak_retained_tokens": 150, "dense_equivalent_tokens": 150}
    records = [
        _record("p1", "dense", True, dense_kv),
        _record("p2", "dense", True, dense_kv),
        _record(
            "p1", "raas@32", True, {"peak_retained_tokens": 90, "dense_equivalent_tokens": 150}
        ),
        _record(
            "p2", "raas@32", False, {"peak_retained_tokens": 60, "dense_equivalent_tokens": 50}
        ),
        {"problem_id": "p3", "label": "raas@32", "status": "error", "error": {"code": "x"}},
        _record("other", "dense", True, dense_kv),  # not in this run's problems
    ]
    rows = {r["label"]: r for r in summarize(grid, records, ["p1", "p2", "p3"])}
    assert rows["dense"]["accuracy"] == 1.0 and rows["dense"]["kv"]["saved_fraction"] == 0
    raas = rows["raas@32"]
    assert (raas["answered"], raas["errors"], raas["error_codes"]) == (2, 1, ["x"])
    assert raas["accuracy"] == 0.5
    assert raas["kv"]["saved_fraction"] == pytest.approx(1 - 150 / 200)
    assert raas["kv"]["mean_saved_fraction"] == pytest.approx((0.4 + (1 - 60 / 50)) / 2)
    assert raas["vs_baseline"]["lost"] == ["p2"] and raas["vs_baseline"]["gained"] == []


# --- records ----------------------------------------------------------------------------


def _signature(**kw: Any) -> Signature:
    base = {
        "model": "m",
        "max_tokens": 10,
        "temperature": 0.0,
        "top_p": 1.0,
        "prompt_template": "{question}",
        "problems_sha256": "abc",
        "seed": 0,
    }
    return Signature(**{**base, **kw})


def test_records_keep_the_latest_line_and_count_torn_ones(tmp_path):
    path = tmp_path / "records.jsonl"
    first = {"problem_id": "p", "label": "dense", "status": "error"}
    second = {"problem_id": "p", "label": "dense", "status": "ok"}
    path.write_text(
        json.dumps(first) + "\n" + json.dumps(second) + "\n" + '{"problem_id": "q", "la'
    )
    latest, unreadable = read_records(path)
    assert unreadable == 1 and list(latest.values()) == [second]


def test_signature_mismatch_is_refused():
    records = {"k": {"signature": _signature().as_dict()}}
    check_signature(records, _signature())
    with pytest.raises(SignatureMismatch, match="max_tokens"):
        check_signature(records, _signature(max_tokens=11))


# --- the CLI against a fake endpoint ----------------------------------------------------


def fake_endpoint(calls: list[tuple[str, str | None, float]]) -> FastAPI:
    """Answers `What is a + b?` right under dense and off by one under raas for a + b > 100;
    the first request ever gets a 429 with Retry-After: 1; a budget of 999 is refused."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "t"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        policy = body.get("kv_policy") or {}
        question = body["messages"][0]["content"]
        calls.append((question, policy.get("name"), time.monotonic()))
        if len(calls) == 1:
            err = {
                "error": {"message": "queue full", "type": "rate_limit_error", "code": "queue_full"}
            }
            return JSONResponse(err, status_code=429, headers={"Retry-After": "1"})
        if policy.get("budget_tokens") == 999:
            err = {
                "error": {
                    "message": "budget too big",
                    "type": "invalid_request_error",
                    "code": "invalid_value",
                }
            }
            return JSONResponse(err, status_code=400)
        a, b = map(int, re.findall(r"\d+", question)[:2])
        answer = a + b + (1 if policy.get("name") == "raas" and a + b > 100 else 0)
        dense_eq = 40 + 60 - 1
        peak = dense_eq if policy.get("name") == "dense" else 40 + policy["budget_tokens"] + 16
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": f"So it is \\boxed{{{answer}}}.",
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 40,
                    "completion_tokens": 60,
                    "total_tokens": 100,
                    "kv_cache": {
                        "policy": policy.get("name"),
                        "budget_tokens": policy.get("budget_tokens"),
                        "peak_retained_tokens": min(peak, dense_eq),
                        "dense_equivalent_tokens": dense_eq,
                        "evicted_pages": 1,
                    },
                },
            }
        )

    return app


def test_cli_runs_the_grid_retries_429_reports_errors_and_resumes(tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    rows = [
        {"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}
        for i, (a, b) in enumerate([(1, 2), (60, 70), (5, 5), (90, 20)])
    ]
    problems.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    calls: list[tuple[str, str | None, float]] = []
    out = tmp_path / "out"
    with serve_app(fake_endpoint(calls)) as url:
        argv = [
            "--problems",
            str(problems),
            "--base-url",
            f"{url}/v1",
            "--out",
            str(out),
            "--policies",
            "dense",
            "raas",
            "--budgets",
            "32",
            "999",
            "--concurrency",
            "1",
            "--no-progress",
            "--max-retries",
            "3",
        ]
        assert cli.main(argv) == 0
        first_calls = len(calls)
        results = json.loads((out / "results.json").read_text())
        # Resume: every successful record is kept, only the refused ones are asked again.
        assert cli.main(argv) == 0
        assert len(calls) - first_calls == 4  # the four raas@999 requests
        # A different run into the same directory is refused, not mixed in.
        assert cli.main([*argv, "--max-tokens", "7"]) == 2
    assert "differs in ['max_tokens']" in capsys.readouterr().err
    # 4 problems x 3 points, plus the one 429 retried after its Retry-After.
    assert first_calls == 13
    assert calls[1][2] - calls[0][2] >= 0.9
    by_label = {r["label"]: r for r in results["results"]}
    assert by_label["dense"]["accuracy"] == 1.0
    raas = by_label["raas@32"]
    assert raas["correct"] == 2 and raas["vs_baseline"]["lost"] == ["q1", "q3"]
    assert raas["kv"]["saved_fraction"] == pytest.approx(1 - 88 / 99)
    refused = by_label["raas@999"]
    assert (refused["answered"], refused["errors"], refused["error_codes"]) == (
        0,
        4,
        ["invalid_value"],
    )
    assert results["problem_set"]["issues"] == [
        {"line": 5, "id": None, "reason": results["problem_set"]["issues"][0]["reason"]}
    ]
    assert (out / "accuracy_vs_kv.png").stat().st_size > 1000


def test_past_the_time_limit_nothing_is_sent_and_the_summary_is_empty(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 2?", "answer": "#### 3"}) + "\n")
    calls: list[tuple[str, str | None, float]] = []
    out = tmp_path / "out"
    with serve_app(fake_endpoint(calls)) as url:
        argv = ["--problems", str(problems), "--base-url", f"{url}/v1", "--out", str(out),
                "--policies", "dense", "--time-limit-min", "0", "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert calls == [] and results["problem_set"]["complete"] == 0
    assert results["results"][0]["answered"] == 0
