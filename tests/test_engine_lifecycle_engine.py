"""An embedded engine's life outside requests: idle, then stopped under a drain.

`raas-serve serve` (embedded mode, its own process) on the tiny model with a 2 s drain,
in order:

- idle, the engine's processes use a small fraction of a core (SGLang's scheduler
  otherwise polls in a busy loop and keeps a whole core busy; the CPU default is
  `--sleep-on-idle`);
- its sockets are on loopback, but for the one SGLang cannot bind there;
- a stream far longer than the drain is open when SIGTERM arrives. Its client must read a
complete response that ends with the documented `shutting_down` error event and
`data: [DONE]` (no broken chunked body), the gateway exits 0 without an ASGI exception,
and SGLang is stopped the way it stops cleanly (its launcher alone gets SIGTERM), so no
scheduler "crash" (SIGQUIT) shows in its log and nothing is left running.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.idle_cpu import listening_sockets
from tests.support.embedded_gateway import Served, tiny_embedded_gateway
from tests.support.sglang_server import descendants, tree_cpu_s
from tests.test_gateway_engine import LONG, MODEL, wait_for

pytestmark = pytest.mark.engine

DRAIN_S = 2
IDLE_S = 5.0
# A busy-polling scheduler alone is one core; sleeping, the tree measured ~0.0x here
# (docs/operations.md), with room for a gateway probe's one-token generation.
IDLE_CORES_LIMIT = 0.3


@pytest.fixture(scope="module")
def served(bundled_model_path, tmp_path_factory) -> Iterator[Served]:
    env = {
        "RAAS_DRAIN_TIMEOUT_S": str(DRAIN_S),
        # Probes are generations too: rarely, so that idle means idle.
        "RAAS_ENGINE_HEALTH_INTERVAL_S": "5",
    }
    workdir = tmp_path_factory.mktemp("lifecycle")
    with tiny_embedded_gateway(Path(bundled_model_path), workdir, env) as srv:
        yield srv


def test_an_idle_engine_does_not_burn_a_core(served):
    engine = served.engine_pid()
    family = {engine} | descendants(engine)
    before, started = tree_cpu_s(family), time.monotonic()
    time.sleep(IDLE_S)  # the idle period measured
    cores = (tree_cpu_s(family) - before) / (time.monotonic() - started)
    assert cores < IDLE_CORES_LIMIT, f"idle engine used {cores:.2f} cores"


def test_the_engine_listens_on_loopback_but_for_its_torch_distributed_store(served):
    """SGLang binds its HTTP server (to RAAS_ENGINE_HOST) and its ZMQ sockets to
    loopback; torch.distributed's TCPStore in the scheduler listens on every interface
    and has no option to do otherwise. docs/operations.md says so, and the
    NetworkPolicy admits only the gateway's port."""
    engine = served.engine_pid()
    sockets = {pid: listening_sockets({pid}) for pid in {engine} | descendants(engine)}
    assert any("127.0.0.1:" in a for a in sockets[engine]), sockets
    exposed = {
        pid: [a for a in addrs if not a.startswith("127.")] for pid, addrs in sockets.items()
    }
    exposed = {pid: addrs for pid, addrs in exposed.items() if addrs}
    assert len(exposed) <= 1, sockets
    for pid, addrs in exposed.items():
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sglang::scheduler")
        assert len(addrs) == 1, sockets


def test_drain_cuts_a_long_stream_with_an_error_event_and_stops_sglang_cleanly(served):
    family = descendants(served.process.pid)
    body = {
        "model": MODEL,
        "messages": LONG,
        "max_tokens": 3000,  # tens of seconds of decoding here
        "stream": True,
        "ignore_eos": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                break
        signalled = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        # A broken chunked body raises here (httpx.RemoteProtocolError).
        events += [line[6:] for line in lines if line.startswith("data: ")]
    ended = time.monotonic() - signalled

    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error", error
    assert DRAIN_S <= ended < DRAIN_S + 10
    assert served.process.wait(timeout=60) == 0
    log = served.log_path.read_text()
    assert "gateway.drain_cut" in log
    assert "Exception in ASGI application" not in log
    assert '"graceful":true' in log.replace(" ", ""), served.logs()
    engine_log = served.engine_log_path.read_text(errors="replace")
    assert "SIGQUIT" not in engine_log, served.logs()
    wait_for(lambda: not [pid for pid in family if Path(f"/proc/{pid}").exists()], 10)
