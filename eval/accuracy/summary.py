"""Per policy point: accuracy with its interval, the pairing against dense, output length
and the KV memory saved as the server reported it (`usage.kv_cache`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from eval.accuracy.policy_grid import PolicyPoint, baseline_label
from eval.accuracy.statistics import paired_against, wilson_interval


def _kv_saved(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Saved = 1 - peak retained / dense-equivalent tokens (docs/api.md, `usage.kv_cache`):
    summed over requests (the memory a batch of them needs) and averaged per request."""
    pairs = []
    for r in records:
        kv = r.get("kv_cache") or {}
        peak, dense = kv.get("peak_retained_tokens"), kv.get("dense_equivalent_tokens")
        if isinstance(peak, int) and isinstance(dense, int) and dense > 0:
            pairs.append((peak, dense))
    if not pairs:
        return {"reported": 0, "saved_fraction": None, "mean_saved_fraction": None}
    peak_sum = sum(p for p, _ in pairs)
    dense_sum = sum(d for _, d in pairs)
    return {
        "reported": len(pairs),
        "peak_retained_tokens": peak_sum,
        "dense_equivalent_tokens": dense_sum,
        "saved_fraction": 1 - peak_sum / dense_sum,
        "mean_saved_fraction": sum(1 - p / d for p, d in pairs) / len(pairs),
        "evicted_pages": sum(
            int((r.get("kv_cache") or {}).get("evicted_pages") or 0) for r in records
        ),
    }


def complete_problems(
    grid: Sequence[PolicyPoint], records: Iterable[Mapping[str, Any]], problem_ids: Iterable[str]
) -> list[str]:
    """The problems with a record (answer or error) for every grid point: a run cut by its
    time limit is summarised on these only, so every policy is scored on the same set."""
    seen: dict[str, set[str]] = {}
    for r in records:
        seen.setdefault(str(r.get("problem_id")), set()).add(str(r.get("label")))
    labels = {p.label for p in grid}
    return [pid for pid in problem_ids if labels <= seen.get(pid, set())]


def summarize(
    grid: Sequence[PolicyPoint], records: Iterable[Mapping[str, Any]], problem_ids: Iterable[str]
) -> list[dict[str, Any]]:
    wanted = set(problem_ids)
    by_label: dict[str, list[Mapping[str, Any]]] = {p.label: [] for p in grid}
    for r in records:
        if r.get("label") in by_label and r.get("problem_id") in wanted:
            by_label[r["label"]].append(r)
    verdicts = {
        label: {r["problem_id"]: bool(r.get("correct")) for r in rs if r.get("status") == "ok"}
        for label, rs in by_label.items()
    }
    base = baseline_label(grid)
    rows = []
    for point in grid:
        rs = by_label[point.label]
        ok = [r for r in rs if r.get("status") == "ok"]
        correct = sum(1 for r in ok if r.get("correct"))
        lengths = [
            r["completion_tokens"] for r in ok if isinstance(r.get("completion_tokens"), int)
        ]
        lo, hi = wilson_interval(correct, len(ok))
        row: dict[str, Any] = {
            "label": point.label,
            "policy": point.name,
            "budget_tokens": point.budget_tokens,
            "kv_policy": point.kv_policy(),
            "answered": len(ok),
            "errors": len(rs) - len(ok),
            "error_codes": sorted(
                {str((r.get("error") or {}).get("code")) for r in rs if r not in ok}
            ),
            "no_answer": sum(1 for r in ok if r.get("extracted") is None),
            "truncated": sum(1 for r in ok if r.get("finish_reason") == "length"),
            "correct": correct,
            "accuracy": correct / len(ok) if ok else None,
            "ci95": [lo, hi] if ok else None,
            "mean_completion_tokens": sum(lengths) / len(lengths) if lengths else None,
            "kv": _kv_saved(ok),
        }
        if base is not None and point.label != base:
            paired = paired_against(verdicts[base], verdicts[point.label])
            row["vs_baseline"] = {
                "baseline": base,
                "pairs": paired.pairs,
                "both_correct": paired.both_correct,
                "both_wrong": paired.both_wrong,
                "lost": paired.lost,
                "gained": paired.gained,
                "accuracy_delta": paired.accuracy_delta,
                "mcnemar_p": paired.mcnemar_p,
            }
        rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| policy | answered | accuracy (95% CI) | vs dense: lost / gained (p) "
        "| mean output tokens | KV saved (total / mean) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r["ci95"]
        acc = "-" if ci is None else f"{_pct(r['accuracy'])} ({_pct(ci[0])}-{_pct(ci[1])})"
        vs = r.get("vs_baseline")
        paired = (
            "-"
            if vs is None
            else f"{len(vs['lost'])} / {len(vs['gained'])} ({vs['mcnemar_p']:.2f})"
        )
        length = r["mean_completion_tokens"]
        kv = r["kv"]
        saved = f"{_pct(kv['saved_fraction'])} / {_pct(kv['mean_saved_fraction'])}"
        errors = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(
            f"| {r['label']} | {r['answered']}{errors} | {acc} | {paired} "
            f"| {'-' if length is None else f'{length:.1f}'} | {saved} |"
        )
    return "\n".join(lines)
