"""Summary statistics of a run, defined as in SGLang's bench_serving (`calculate_metrics`,
`calculate_goodput`) unless docs/loadtest.md says otherwise.

- TTFT, ITL, end-to-end latency: from successful requests only; ITL pools every gap.
- TPOT per request: (latency - TTFT) / (output tokens - 1), for requests of > 1 token.
- Percentiles: numpy's linear interpolation.
- Throughput: per second of the whole run (first send to last end).
- Goodput: successful requests meeting every SLO, per second; attainment over all sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from loadtest.client import RequestRecord
from loadtest.config import Slo

PERCENTILES = (50, 90, 99)


class Distribution(BaseModel):
    """In milliseconds; the statistics are None when there is no sample."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def distribution(values_s: Sequence[float]) -> Distribution:
    if not values_s:
        return Distribution(
            count=0, mean_ms=None, p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None
        )
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    return Distribution(
        count=len(ms),
        mean_ms=float(ms.mean()),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(ms.max()),
    )


def tpot_s(record: RequestRecord) -> float | None:
    if record.ttft_s is None or record.output_tokens <= 1:
        return None
    return (record.latency_s - record.ttft_s) / (record.output_tokens - 1)


class Goodput(BaseModel):
    slos_ms: dict[str, float]
    good_requests: int
    request_goodput: float
    slo_attainment: float
    slo_attainment_by_metric: dict[str, float]


def goodput(records: Sequence[RequestRecord], slo: Slo, duration_s: float) -> Goodput | None:
    slos = slo.as_dict()
    if not slos or not records:
        return None
    good = 0
    met_by = dict.fromkeys(slos, 0)
    for record in records:
        if not record.success or record.ttft_s is None:
            continue
        observed = {
            "ttft": record.ttft_s * 1000,
            # bench_serving counts a one-token answer's TPOT as 0.
            "tpot": (tpot_s(record) or 0.0) * 1000,
            "e2el": record.latency_s * 1000,
        }
        met = [name for name, limit in slos.items() if observed[name] <= limit]
        for name in met:
            met_by[name] += 1
        good += len(met) == len(slos)
    return Goodput(
        slos_ms=slos,
        good_requests=good,
        request_goodput=good / duration_s,
        slo_attainment=good / len(records),
        slo_attainment_by_metric={name: n / len(records) for name, n in met_by.items()},
    )


class KvTotals(BaseModel):
    """Sums of what the server reported in `usage.kv_cache`, over successful requests."""

    requests_reported: int = 0
    peak_retained_tokens: int = 0
    dense_equivalent_tokens: int = 0
    evicted_pages: int = 0

    @property
    def savings_ratio(self) -> float | None:
        if self.dense_equivalent_tokens <= 0:
            return None
        return 1.0 - self.peak_retained_tokens / self.dense_equivalent_tokens

    def add(self, kv: dict[str, object]) -> None:
        retained, dense = kv.get("peak_retained_tokens"), kv.get("dense_equivalent_tokens")
        if not isinstance(retained, int) or not isinstance(dense, int):
            return
        self.requests_reported += 1
        self.peak_retained_tokens += retained
        self.dense_equivalent_tokens += dense
        evicted = kv.get("evicted_pages")
        self.evicted_pages += evicted if isinstance(evicted, int) else 0


class KvSavings(BaseModel):
    total: KvTotals
    savings_ratio: float | None
    by_policy: dict[str, KvTotals]
    savings_ratio_by_policy: dict[str, float | None]


def kv_savings(records: Sequence[RequestRecord]) -> KvSavings:
    total = KvTotals()
    by_policy: dict[str, KvTotals] = {}
    for record in records:
        if record.success and record.kv_cache:
            total.add(record.kv_cache)
            by_policy.setdefault(record.policy, KvTotals()).add(record.kv_cache)
    return KvSavings(
        total=total,
        savings_ratio=total.savings_ratio,
        by_policy=by_policy,
        savings_ratio_by_policy={name: t.savings_ratio for name, t in by_policy.items()},
    )


class Summary(BaseModel):
    sent: int
    completed: int
    failed: int
    duration_s: float
    outcomes: dict[str, int]
    errors_by_code: dict[str, int]
    completed_by_policy: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    # bench_serving's "concurrency": summed latency of successful requests over duration.
    mean_concurrency: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    goodput: Goodput | None
    kv: KvSavings


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> Summary:
    ok = [r for r in records if r.success]
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    return Summary(
        sent=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        outcomes=dict(Counter(r.outcome for r in records)),
        errors_by_code=dict(Counter(r.error_code for r in records if r.error_code)),
        completed_by_policy=dict(Counter(r.policy for r in ok)),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        input_throughput=input_tokens / duration_s,
        output_throughput=output_tokens / duration_s,
        total_throughput=(input_tokens + output_tokens) / duration_s,
        mean_concurrency=sum(r.latency_s for r in ok) / duration_s,
        ttft=distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=distribution(tpots),
        itl=distribution([gap for r in ok for gap in r.itl_s]),
        e2e=distribution([r.latency_s for r in ok]),
        goodput=goodput(records, slo, duration_s),
        kv=kv_savings(records),
    )


class TimelinePoint(BaseModel):
    """One window of the run: latency percentiles of requests that ended in it, and the
    KV totals reported up to its end."""

    end_s: float
    requests: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    cumulative_retained_tokens: int
    cumulative_dense_tokens: int


def timeline(records: Sequence[RequestRecord], window_s: float) -> list[TimelinePoint]:
    ok = sorted((r for r in records if r.success), key=lambda r: r.end_s)
    if not ok:
        return []
    points: list[TimelinePoint] = []
    kv = KvTotals()
    i = 0
    end = window_s
    while i < len(ok):
        window: list[RequestRecord] = []
        while i < len(ok) and ok[i].end_s <= end:
            window.append(ok[i])
            if ok[i].kv_cache:
                kv.add(ok[i].kv_cache)
            i += 1
        ttft = distribution([r.ttft_s for r in window if r.ttft_s is not None])
        e2e = distribution([r.latency_s for r in window])
        points.append(
            TimelinePoint(
                end_s=end,
                requests=len(window),
                ttft_p50_ms=ttft.p50_ms,
                ttft_p99_ms=ttft.p99_ms,
                e2e_p50_ms=e2e.p50_ms,
                e2e_p99_ms=e2e.p99_ms,
                cumulative_retained_tokens=kv.peak_retained_tokens,
                cumulative_dense_tokens=kv.dense_equivalent_tokens,
            )
        )
        end += window_s
    return points
