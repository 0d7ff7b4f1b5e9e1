"""Where one-at-a-time latency goes, hop by hop: reads the event logs that
`benchmarks/gateway_overhead.py --hop-trace DIR` writes (benchmarks/hop_trace/hop_probe.py)
and prints, per arm (direct, through the gateway), the median time from the client's
request to each step of the exchange, and what the gateway adds between them.

    python benchmarks/hop_report.py DIR [--skip 20] [--out report.json]

Steps, in microseconds from the client's first write of the request:
- engine_received:  the engine's server reads the request's last bytes
- engine_first:     the engine sends its first body chunk (stream: the first event)
- source_first:     the first body chunk leaves for the client (the engine's in the
                    direct arm, the gateway's through it)
- client_first:     the client's first read after that
- source_last:      the response's last send that carries bytes (starlette ends a
                    streamed response with an empty send after `[DONE]`, which a
                    client that stops at `[DONE]` never waits for)
- client_last:      the client's last read of the response
Gateway arm only:
- gateway_received: the gateway reads the request's last bytes
- gateway_sent:     the gateway writes the request to the engine
- gateway_exit:     the gateway's middleware returns, after its post-response work

On a machine where the client shares the gateway's CPU, `client_last - source_last`
shows how long the client waits for the CPU while the gateway finishes its
post-response work (`gateway_exit - source_last`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEPS = ("engine_received", "engine_first", "source_first", "client_first")
TAIL = ("source_last", "client_last")
GATEWAY_STEPS = ("gateway_received", "gateway_sent", "gateway_exit")


@dataclass(frozen=True)
class Event:
    t: int
    role: str  # client, gateway or engine
    kind: str
    fields: tuple[str, ...]


def load(directory: Path) -> list[Event]:
    """Every process's events in time order, up to the first phase mark (the throughput
    phase's concurrent requests would interleave). A process's role follows from what
    it logged: the gateway talks to the engine (ER/EW), the client writes (CW), the
    other server is the engine. Processes with nothing to say (an engine's workers)
    drop out."""
    events: list[Event] = []
    for path in sorted(directory.glob("*.log")):
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r[0] != "ERR"]
        kinds = {r[0] for r in rows} - {"MARK"}
        if not kinds:
            continue
        role = "gateway" if "ER" in kinds else "client" if "CW" in kinds else "engine"
        events += [Event(int(r[2]), role, r[0], tuple(r[3:])) for r in rows]
    events.sort(key=lambda e: e.t)
    end = next((i for i, e in enumerate(events) if e.kind == "MARK"), len(events))
    return events[:end]


def requests(events: Sequence[Event]) -> list[list[Event]]:
    """One window per client request: from a client write that follows a client read
    (or opens the trace) up to the next such write."""
    starts: list[int] = []
    last_client = ""
    for i, e in enumerate(events):
        if e.role == "client":
            if e.kind == "CW" and last_client != "CW":
                starts.append(i)
            last_client = e.kind
    bounds = [*starts, len(events)]
    return [list(events[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def _body(e: Event) -> bool:
    return e.kind == "SS" and e.fields[1] == "http.response.body" and e.fields[2] != "0"


def steps(window: Sequence[Event]) -> tuple[str, str, dict[str, float]] | None:
    """The window's mode, arm and step times (us from its start); None for an
    incomplete one (the trace's first or last request, a failed one)."""
    t0 = window[0].t
    arm = "gateway" if any(e.role == "gateway" for e in window) else "direct"
    source = "gateway" if arm == "gateway" else "engine"
    engine_bodies = sum(1 for e in window if e.role == "engine" and _body(e))
    mode = "stream" if engine_bodies > 1 else "nonstream"

    def first(role: str, pred: Any, after: int = 0) -> int | None:
        return next((e.t for e in window if e.role == role and e.t >= after and pred(e)), None)

    def last(role: str, pred: Any) -> int | None:
        return next((e.t for e in reversed(window) if e.role == role and pred(e)), None)

    engine_first = first("engine", _body)
    source_first = first(source, _body)
    found: dict[str, int | None] = {
        "engine_received": last("engine", lambda e: e.kind == "SR" and e.t < (engine_first or 0)),
        "engine_first": engine_first,
        "source_first": source_first,
        "client_first": first("client", lambda e: e.kind == "CR", after=source_first or 0),
        "source_last": last(source, _body),
        "client_last": last("client", lambda e: e.kind == "CR"),
    }
    if arm == "gateway":
        sent = first("gateway", lambda e: e.kind == "EW")
        found["gateway_received"] = last("gateway", lambda e: e.kind == "SR" and e.t < (sent or 0))
        found["gateway_sent"] = sent
        found["gateway_exit"] = last("gateway", lambda e: e.kind == "GX")
    if any(v is None for v in found.values()):
        return None
    return mode, arm, {k: (v - t0) / 1000 for k, v in found.items() if v is not None}


def report(directory: Path, skip: int = 0) -> dict[str, Any]:
    """Per mode (stream, nonstream) found in the trace."""
    by_mode: dict[str, dict[str, list[dict[str, float]]]] = {}
    for window in requests(load(directory))[skip:]:
        found = steps(window)
        if found is not None:
            mode, arm, times = found
            by_mode.setdefault(mode, {"direct": [], "gateway": []})[arm].append(times)
    modes = {m: arms for m, arms in by_mode.items() if arms["direct"] and arms["gateway"]}
    if not modes:
        raise SystemExit(f"no complete request of both arms in {directory}")
    return {mode: _mode_report(arms) for mode, arms in sorted(modes.items())}


def _mode_report(by_arm: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    medians = {
        arm: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for arm, rows in by_arm.items()
    }
    gw, direct = by_arm["gateway"], by_arm["direct"]

    def median_of(rows: list[dict[str, float]], a: str, b: str) -> float:
        return statistics.median(r[b] - r[a] for r in rows)

    added = {
        # What the gateway adds to each leg: the same interval in both arms, medians.
        "request_to_engine": medians["gateway"]["engine_received"]
        - medians["direct"]["engine_received"],
        "first_chunk_to_client": median_of(gw, "engine_first", "client_first")
        - median_of(direct, "engine_first", "client_first"),
        "last_send_to_client_read": median_of(gw, "source_last", "client_last")
        - median_of(direct, "source_last", "client_last"),
    }
    gateway = {
        "receive_to_engine_write": median_of(gw, "gateway_received", "gateway_sent"),
        "engine_first_to_gateway_first": median_of(gw, "engine_first", "source_first"),
        "work_after_last_send": median_of(gw, "source_last", "gateway_exit"),
        "client_wait_after_last_send": median_of(gw, "source_last", "client_last"),
    }
    return {
        "requests": {arm: len(rows) for arm, rows in by_arm.items()},
        "median_us": medians,
        "gateway_adds_us": added,
        "gateway_us": gateway,
    }


def print_report(report: dict[str, Any]) -> None:
    for mode, result in report.items():
        print(f"\n{mode}")
        _print_mode(result)


def _print_mode(result: dict[str, Any]) -> None:
    print(f"requests: {result['requests']}")
    print(f"{'step (us from the request)':28} {'direct':>10} {'gateway':>10}")
    for step in (*STEPS, *TAIL, *GATEWAY_STEPS):
        row = [result["median_us"][arm].get(step) for arm in ("direct", "gateway")]
        cells = [f"{v:10.1f}" if v is not None else f"{'-':>10}" for v in row]
        print(f"{step:28} {cells[0]} {cells[1]}")
    print("\nthe gateway adds (medians, us):")
    for name, value in result["gateway_adds_us"].items():
        print(f"  {name:36} {value:8.1f}")
    print("inside the gateway arm (medians, us):")
    for name, value in result["gateway_us"].items():
        print(f"  {name:36} {value:8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N requests")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = report(args.directory, args.skip)
    print_report(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
