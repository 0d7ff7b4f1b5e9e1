#!/usr/bin/env python3
"""Kubernetes preStop hook: wait until the gateway has no chat requests left, then exit.

While preStop runs, Kubernetes takes the terminating pod out of the Service's endpoints,
so new requests stop arriving; the ones already admitted or queued (long reasoning
streams included) finish. When both `raas_requests_in_flight` and
`raas_requests_queued` on the gateway's /metrics have read 0 for a few polls, or the
timeout passes, this exits and Kubernetes sends SIGTERM. It always exits 0: a failed
preStop hook would only delay the SIGTERM. Standard library only; installed in both
images as `raas-drain`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

GAUGES = ("raas_requests_in_flight", "raas_requests_queued")


def pending_requests(metrics_text: str) -> float | None:
    """In-flight plus queued chat requests, or None if the gauges are missing."""
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in GAUGES:
            values[name] = float(value)
    if len(values) != len(GAUGES):
        return None
    return sum(values.values())


def read_pending(url: str, timeout_s: float) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return pending_requests(resp.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def drain(
    url: str,
    *,
    timeout_s: float,
    settle_s: float,
    interval_s: float,
    idle_polls: int,
    log=print,
) -> bool:
    """Block until `idle_polls` consecutive polls see no pending request; False on timeout."""
    deadline = time.monotonic() + timeout_s
    # Endpoint removal takes a moment to reach every proxy: requests may still arrive.
    time.sleep(min(settle_s, timeout_s))
    idle = 0
    while time.monotonic() < deadline:
        pending = read_pending(url, timeout_s=max(interval_s, 1.0))
        if pending is None:
            log(f"raas-drain: no metrics at {url}; not waiting")
            return True
        idle = idle + 1 if pending == 0 else 0
        if idle >= idle_polls:
            log("raas-drain: no requests in flight")
            return True
        time.sleep(interval_s)
    log(f"raas-drain: requests still in flight after {timeout_s:.0f}s; stopping anyway")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raas-drain", description=__doc__.splitlines()[0])
    port = os.environ.get("RAAS_PORT", "8000")
    parser.add_argument("--url", default=f"http://127.0.0.1:{port}/metrics")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds, at most")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before polling")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--idle-polls", type=int, default=3, help="idle polls in a row")
    args = parser.parse_args(argv)
    drain(
        args.url,
        timeout_s=args.timeout,
        settle_s=args.settle,
        interval_s=args.interval,
        idle_polls=args.idle_polls,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
