"""Loaded at start-up by every Python process whose PYTHONPATH lists this directory (the
gateway, the engine and their children, as `benchmarks/gateway_overhead.py --hop-trace`
starts them): traces their HTTP hops when HOP_TRACE_DIR is set (see hop_probe.py)."""

import hop_probe

hop_probe.install_from_env()
