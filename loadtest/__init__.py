"""A load generator for OpenAI-compatible chat endpoints (async, streaming).

Closed-loop concurrency or open-loop Poisson arrivals, prompt sets (long-reasoning ones
included), a per-request `kv_policy` mix; reports TTFT, TPOT, ITL, end-to-end latency,
throughput, goodput against SLOs, errors by status and the KV savings the server reported
(`usage.kv_cache`). Metric definitions follow SGLang's bench_serving; docs/loadtest.md says
where they differ.
"""

from loadtest.config import LoadConfig, PolicyChoice, Slo
from loadtest.runner import RunResult, run_load

__all__ = ["LoadConfig", "PolicyChoice", "RunResult", "Slo", "run_load"]
