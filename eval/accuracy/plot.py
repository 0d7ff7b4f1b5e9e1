"""Accuracy against KV memory saved: one line per policy across its budgets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_accuracy_vs_kv(rows: Sequence[Mapping[str, Any]], out: Path, title: str) -> bool:
    """Write the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["accuracy"] is not None:
            lines.setdefault(r["policy"], []).append(r)
    for policy, points in lines.items():
        # Memory saved, not the budget, on x: budgets mean different savings on different
        # output lengths, and the saving is what a user trades accuracy for.
        points = sorted(points, key=lambda r: r["kv"]["saved_fraction"] or 0.0)
        xs = [100 * (r["kv"]["saved_fraction"] or 0.0) for r in points]
        ys = [100 * r["accuracy"] for r in points]
        err = [
            [100 * (r["accuracy"] - r["ci95"][0]) for r in points],
            [100 * (r["ci95"][1] - r["accuracy"]) for r in points],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=policy)
        for x, y, r in zip(xs, ys, points, strict=True):
            if r["budget_tokens"] is not None:
                ax.annotate(
                    str(r["budget_tokens"]),
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
    ax.set_xlabel("KV memory saved vs dense (%, from usage.kv_cache)")
    ax.set_ylabel("accuracy (%, 95% Wilson interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if lines:  # an empty run still gets its (empty) axes, without a legend warning
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
