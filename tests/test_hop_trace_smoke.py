"""The hop trace end to end at toy size: `gateway_overhead.py --hop-trace` logs every
HTTP hop of the client, the gateway and the stub engine, and `hop_report.py` turns the
logs into step times per arm.

Run as a subprocess: tracing patches the process that asks for it and every process it
starts afterwards, which must not include the rest of the test session. No timing
assertions beyond the order of the steps within one request.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from tests.support.bench_script import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))


def test_every_hop_is_traced_and_reported_in_order(tmp_path, bundled_model_path):
    trace = tmp_path / "trace"
    cmd = [sys.executable, "benchmarks/gateway_overhead.py", "--engine", "stub"]
    cmd += ["--model-path", str(bundled_model_path), "--stub-delay-ms", "10"]
    cmd += ["--stub-token-delay-ms", "2", "--modes", "stream", "--pairs", "4"]
    cmd += ["--warmup-pairs", "1", "--concurrency", "2", "--rounds", "1", "--requests", "2"]
    cmd += ["--hop-trace", str(trace), "--out", str(tmp_path / "out.json")]
    if len(CPUS) >= 2:
        cmd += ["--pin", f"{CPUS[0]}:{CPUS[1]}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    logs = {p.name: p.read_text() for p in trace.glob("*.log")}
    # The client, the gateway and the stub each wrote events, and every patch applied.
    assert len([text for text in logs.values() if text.strip()]) >= 3
    errors = [line for text in logs.values() for line in text.splitlines() if "ERR" in line]
    assert errors == []

    hop_report = load_benchmark("hop_report")
    result = hop_report.report(trace)
    # Warm-up and latency pairs, one request per arm each; the throughput phase is cut off.
    assert set(result) == {"stream"}
    result = result["stream"]
    assert result["requests"] == {"direct": 5, "gateway": 5}
    for arm, steps in result["median_us"].items():
        order = ["engine_received", "engine_first", "source_first", "client_first"]
        values = [steps[s] for s in order]
        assert values == sorted(values), (arm, steps)
        assert steps["source_last"] <= steps["client_last"]
    gw = result["median_us"]["gateway"]
    assert gw["gateway_received"] < gw["gateway_sent"] < gw["engine_received"]
    assert result["gateway_us"]["work_after_last_send"] > 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        hop_report.print_report({"stream": result})
    assert "the gateway adds" in printed.getvalue()
