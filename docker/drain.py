#!/usr/bin/env python3
"""Kubernetes preStop hook: wait until the gateway has no chat requests left, then exit.

While preStop runs, Kubernetes takes the terminating pod out of the Service's endpoints,
so new requests stop arriving; the ones already admitted or queued (long reasoning
streams included) finish. When both `raas_requests_in_flight` and
`raas_requests_queued` on the gateway's /metrics have read 0 for a few polls, or the
timeout passes, this exits and Kubernetes sends SIGTERM. A /metrics read that is slow or
fails counts as busy, never idle (the gateway's /metrics waits for the engine's, seconds
on a loaded node); only a refused connection means there is nothing left to wait for.
It always exits 0: a failed preStop hook would only delay the SIGTERM. Standard library
only; installed in both images as `raas-drain`.
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


# The gateway's /metrics waits up to RAAS_ENGINE_METRICS_TIMEOUT_S (2 s) for the engine's
# before it answers, longer on a loaded node: a read must be allowed well past that.
READ_TIMEOUT_S = 10.0


class Unknown(Exception):
    """The gateway is there but did not say how many requests it holds (slow, an error)."""


def read_pending(url: str, timeout_s: float) -> float | None:
    """Pending requests; None when nothing listens (the gateway is gone).

    Raises Unknown when the gateway did not answer in time or answered without the gauges:
    that is a busy gateway, never an idle one.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise Unknown(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None
        raise Unknown(str(exc.reason)) from None
    except ConnectionRefusedError:
        return None
    except (OSError, ValueError) as exc:
        # Timeouts (socket.timeout is an OSError), resets mid-answer, a malformed URL.
        raise Unknown(repr(exc)) from None
    pending = pending_requests(text)
    if pending is None:
        raise Unknown("no raas_requests_in_flight/raas_requests_queued in the answer")
    return pending


def drain(
    url: str,
    *,
    timeout_s: float,
    settle_s: float,
    interval_s: float,
    idle_polls: int,
    read_timeout_s: float = READ_TIMEOUT_S,
    log=print,
) -> bool:
    """Block until `idle_polls` consecutive polls see no pending request; False on timeout.

    Only a refused connection ends the wait early (nothing listens: nothing to drain). A
    slow or failed read is not "idle": it resets the count and the wait goes on.
    """
    deadline = time.monotonic() + timeout_s
    # Endpoint removal takes a moment to reach every proxy: requests may still arrive.
    time.sleep(min(settle_s, timeout_s))
    idle = 0
    while (left := deadline - time.monotonic()) > 0:
        try:
            pending = read_pending(url, timeout_s=min(read_timeout_s, left))
        except Unknown as exc:
            log(f"raas-drain: no answer from {url} ({exc}); still waiting")
            idle = 0
        else:
            if pending is None:
                log(f"raas-drain: nothing listens at {url}; not waiting")
                return True
            idle = idle + 1 if pending == 0 else 0
            if idle >= idle_polls:
                log("raas-drain: no requests in flight")
                return True
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
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
    parser.add_argument(
        "--read-timeout", type=float, default=READ_TIMEOUT_S, help="seconds per /metrics read"
    )
    args = parser.parse_args(argv)
    drain(
        args.url,
        timeout_s=args.timeout,
        settle_s=args.settle,
        interval_s=args.interval,
        idle_polls=args.idle_polls,
        read_timeout_s=args.read_timeout,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
