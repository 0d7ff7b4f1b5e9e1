"""What an idle SGLang engine costs on the CPU, with and without `--sleep-on-idle`, side
by side in one run; and whether sleeping costs a request any latency.

Each arm starts the engine with the command `raas-serve` builds for this machine (the
same flags, on the bundled model unless `--model tiny`), waits until it answers, lets it
settle, then reads the CPU time of its whole process tree over `--idle-s` seconds of no
requests. Then it times `--requests` short greedy completions one at a time (the first
token after an idle period is what a sleeping scheduler could delay). The arms alternate
(off, on, off, on, ...) over `--rounds`, so drift on a shared machine hits both alike.

Also prints every TCP socket the engine's processes listen on, with its address.

  python benchmarks/idle_cpu.py --rounds 2 --out docs/results/idle_cpu.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.bundled_model import prepare_model  # noqa: E402
from service.engine.command import EngineOptions, build_engine_command  # noqa: E402
from tests.support.sglang_server import (  # noqa: E402
    descendants,
    free_port,
    stop_process_group,
    tree_cpu_s,
    wait_healthy,
)
from tests.support.tiny_model import make_tiny_model  # noqa: E402


def listening_sockets(pids: set[int]) -> list[str]:
    """`address:port` of every listening TCP socket these processes hold."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            if family == 4:
                host = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
            else:
                host = "::" if int(addr, 16) == 0 else addr
            found.append(f"{host}:{int(port, 16)}")
    return sorted(found)


def run_arm(model: str, sleep: bool, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    extra: tuple[str, ...] = ("--load-format", "dummy") if args.model == "tiny" else ()
    cmd = build_engine_command(
        EngineOptions(
            model_path=model,
            port=port,
            dtype="float32",
            sleep_on_idle=sleep,
            extra_args=extra,
        )
    )
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="idle-cpu-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, proc, 600)
            time.sleep(args.settle_s)  # start-up work (warm-up, GC) is not idle cost
            family = {proc.pid} | descendants(proc.pid)
            sockets = listening_sockets(family)
            before, started = tree_cpu_s(family), time.monotonic()
            time.sleep(args.idle_s)  # the measured idle period itself
            cores = (tree_cpu_s(family) - before) / (time.monotonic() - started)
            latencies = []
            body = {
                "model": "default",
                "messages": [{"role": "user", "content": "Name three colours."}],
                "max_tokens": 1,
                "temperature": 0,
            }
            with httpx.Client(timeout=120) as client:
                for _ in range(args.requests):
                    time.sleep(args.gap_s)  # let the scheduler fall idle again
                    t0 = time.perf_counter()
                    client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                    latencies.append(time.perf_counter() - t0)
        finally:
            stop_process_group(proc)
    return {
        "sleep_on_idle": sleep,
        "idle_cores": cores,
        "first_token_s_median": statistics.median(latencies),
        "first_token_s": latencies,
        "listening": sockets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["bundled", "tiny"], default="bundled")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--gap-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # A plain SIGTERM (a `timeout` running out) would skip the engines' clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    bundled = prepare_model().path
    model = bundled
    if args.model == "tiny":
        model = make_tiny_model(bundled, Path(tempfile.mkdtemp(prefix="idle-cpu-tiny-")))
    arms: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for sleep in (False, True):
            arms.append(run_arm(str(model), sleep, args))
            print(json.dumps({k: v for k, v in arms[-1].items() if k != "first_token_s"}))
    off = [a for a in arms if not a["sleep_on_idle"]]
    on = [a for a in arms if a["sleep_on_idle"]]
    summary = {
        "idle_cores_off": statistics.median(a["idle_cores"] for a in off),
        "idle_cores_on": statistics.median(a["idle_cores"] for a in on),
        "first_token_s_off": statistics.median(a["first_token_s_median"] for a in off),
        "first_token_s_on": statistics.median(a["first_token_s_median"] for a in on),
    }
    summary["idle_cpu_ratio_on_over_off"] = summary["idle_cores_on"] / summary["idle_cores_off"]
    summary["first_token_ratio_on_over_off"] = (
        summary["first_token_s_on"] / summary["first_token_s_off"]
    )
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"out": str(args.out)}, "arms": arms, "summary": summary},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
