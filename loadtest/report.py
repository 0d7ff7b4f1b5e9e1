"""The three outputs of a run: a rich table, a JSON file, a PNG plot (matplotlib, Agg)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from loadtest.metrics import Distribution, Summary, TimelinePoint, summarize, timeline  # noqa: E402
from loadtest.runner import RunResult  # noqa: E402

LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclasses.dataclass(frozen=True)
class Report:
    result: RunResult
    summary: Summary
    timeline: list[TimelinePoint]

    @classmethod
    def build(cls, result: RunResult, windows: int = 20) -> Report:
        window_s = max(result.duration_s / windows, 0.1)
        return cls(
            result,
            summarize(result.records, result.duration_s, result.config.slo),
            timeline(result.records, window_s),
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_table(report: Report, console: Console) -> None:
    s = report.summary
    latency = Table(title="Latency (ms, successful requests)")
    for column in ("metric", "count", "mean", "p50", "p90", "p99", "max"):
        latency.add_column(column, justify="right" if column != "metric" else "left")
    for name in LATENCIES:
        d: Distribution = getattr(s, name)
        row = (d.mean_ms, d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms)
        latency.add_row(name.upper(), str(d.count), *(_ms(v) for v in row))

    totals = Table(title="Run", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("duration (s)", f"{s.duration_s:.2f}"),
        ("sent / completed / failed", f"{s.sent} / {s.completed} / {s.failed}"),
        ("outcomes", _counts(s.outcomes)),
        ("errors by code", _counts(s.errors_by_code)),
        ("request throughput (req/s)", f"{s.request_throughput:.3f}"),
        ("input tokens/s (server-counted)", f"{s.input_throughput:.1f}"),
        ("output tokens/s (server-counted)", f"{s.output_throughput:.1f}"),
        ("total tokens/s", f"{s.total_throughput:.1f}"),
        ("mean concurrency", f"{s.mean_concurrency:.2f}"),
    ]
    if s.goodput is not None:
        slos = " ".join(f"{k}<={v:g}" for k, v in s.goodput.slos_ms.items())
        rows += [
            (f"goodput (req/s, {slos} ms)", f"{s.goodput.request_goodput:.3f}"),
            ("SLO attainment", f"{s.goodput.slo_attainment:.1%}"),
        ]
    kv = s.kv
    rows.append(
        (
            "KV retained / dense-equivalent (tokens)",
            f"{kv.total.peak_retained_tokens} / {kv.total.dense_equivalent_tokens}",
        )
    )
    rows.append(("KV saved (server-reported)", _ratio(kv.savings_ratio)))
    for policy, ratio in sorted(kv.savings_ratio_by_policy.items()):
        part = kv.by_policy[policy]
        rows.append(
            (
                f"  {policy}",
                f"{_ratio(ratio)} of {part.dense_equivalent_tokens} tokens, "
                f"{part.evicted_pages} pages evicted",
            )
        )
    for what, value in rows:
        totals.add_row(what, value)
    console.print(totals)
    console.print(latency)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def report_json(report: Report) -> dict[str, Any]:
    requests = []
    for record in report.result.records:
        row = dataclasses.asdict(record)
        row.update(outcome=record.outcome, latency_s=record.latency_s, success=record.success)
        requests.append(row)
    return {
        "config": report.result.config.public_dump(),
        "started_at": report.result.started_at,
        "summary": report.summary.model_dump(mode="json"),
        "timeline": [point.model_dump(mode="json") for point in report.timeline],
        "requests": requests,
    }


def write_json(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_json(report), indent=2))
    return path


def write_png(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (bars, over_time, kv) = plt.subplots(1, 3, figsize=(16, 4.8))
    s = report.summary
    width = 0.25
    for k, (label, attr) in enumerate((("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))):
        values = [getattr(getattr(s, name), attr) or 0.0 for name in LATENCIES]
        bars.bar([i + (k - 1) * width for i in range(len(LATENCIES))], values, width, label=label)
    bars.set_xticks(range(len(LATENCIES)), [name.upper() for name in LATENCIES])
    bars.set_ylabel("ms")
    bars.set_title("Latency percentiles (successful requests)")
    bars.legend()

    points = report.timeline
    t = [p.end_s for p in points]
    for attr, label in (
        ("ttft_p50_ms", "TTFT p50"),
        ("ttft_p99_ms", "TTFT p99"),
        ("e2e_p50_ms", "E2E p50"),
        ("e2e_p99_ms", "E2E p99"),
    ):
        over_time.plot(t, [getattr(p, attr) for p in points], marker=".", label=label)
    over_time.set_xlabel("time since start (s)")
    over_time.set_ylabel("ms")
    over_time.set_title("Latency of requests ending in each window")
    over_time.legend()

    kv.plot(t, [p.cumulative_dense_tokens for p in points], label="dense-equivalent")
    kv.plot(t, [p.cumulative_retained_tokens for p in points], label="retained (peak)")
    kv.set_xlabel("time since start (s)")
    kv.set_ylabel("KV tokens, cumulative over requests")
    kv.set_title(f"KV retained vs dense (saved {_ratio(s.kv.savings_ratio)})")
    kv.legend()

    fig.suptitle(
        f"{report.result.config.mode} loop, {s.sent} requests, {s.completed} ok, "
        f"{s.request_throughput:.2f} req/s, {s.output_throughput:.0f} output tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
