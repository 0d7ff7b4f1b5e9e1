"""The SGLang settings the `raas` backend cannot run without, checked at startup.

`raas-serve` passes the right flags, but SGLang loads the backend for anyone who runs
`sglang.launch_server --attention-backend raas`. With the wrong settings the engine
would not fail: it would corrupt or leak KV slots. So the backend refuses to start and
says which flags to change. Nothing here imports SGLang (the check reads attributes).
"""

from __future__ import annotations

from typing import Any

# (attribute, required value, flag to pass, why). The why is part of the error.
_REQUIREMENTS: tuple[tuple[str, object, str, str], ...] = (
    (
        "disable_radix_cache",
        True,
        "--disable-radix-cache",
        "the prefix cache would share rows whose evicted positions point at the padding slot",
    ),
    (
        "disable_overlap_schedule",
        True,
        "--disable-overlap-schedule",
        "overlap scheduling allocates the next step's slot before eviction runs",
    ),
    (
        "enable_mixed_chunk",
        False,
        "no --enable-mixed-chunk",
        "decode requests inside a mixed prefill batch skip the eviction hook",
    ),
    (
        "tp_size",
        1,
        "--tp-size 1",
        "each tensor-parallel rank would score its own heads and evict different pages",
    ),
    ("pp_size", 1, "--pp-size 1", "pipeline stages would evict independently"),
    (
        "speculative_algorithm",
        None,
        "no --speculative-algorithm",
        "draft tokens are verified outside the decode step that evicts",
    ),
)


class UnsupportedServerArgs(ValueError):
    """The engine's settings are unsafe for the raas backend."""


def check_server_args(server_args: Any) -> None:
    """Raise UnsupportedServerArgs naming every setting to change (none: returns)."""
    problems = [
        f"{flag} ({why}; got {attr}={getattr(server_args, attr)!r})"
        for attr, required, flag, why in _REQUIREMENTS
        if hasattr(server_args, attr) and getattr(server_args, attr) != required
    ]
    if problems:
        raise UnsupportedServerArgs(
            "--attention-backend raas needs: " + "; ".join(problems) + ". `raas-serve` sets "
            "these flags itself."
        )
