"""The raas backend refuses SGLang settings under which it would corrupt or leak slots.

The unit tests feed the check plain objects; the engine test launches stock SGLang with
`--attention-backend raas` but without `--disable-radix-cache` and expects it to stop at
startup with the message, not to serve.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from types import SimpleNamespace

import pytest

from raas_backend.sglang_plugin.server_requirements import (
    UnsupportedServerArgs,
    check_server_args,
)
from service.engine_command import EngineOptions, build_engine_command
from tests.support.sglang_server import free_port, heavy_process_lock

SAFE = dict(
    disable_radix_cache=True,
    disable_overlap_schedule=True,
    enable_mixed_chunk=False,
    tp_size=1,
    pp_size=1,
    speculative_algorithm=None,
)


def test_safe_settings_pass():
    check_server_args(SimpleNamespace(**SAFE))


@pytest.mark.parametrize(
    ("attr", "value", "flag"),
    [
        ("disable_radix_cache", False, "--disable-radix-cache"),
        ("disable_overlap_schedule", False, "--disable-overlap-schedule"),
        ("enable_mixed_chunk", True, "--enable-mixed-chunk"),
        ("tp_size", 2, "--tp-size 1"),
        ("pp_size", 2, "--pp-size 1"),
        ("speculative_algorithm", "EAGLE", "--speculative-algorithm"),
    ],
)
def test_each_unsafe_setting_is_named(attr, value, flag):
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(SimpleNamespace(**{**SAFE, attr: value}))
    message = str(exc.value)
    assert flag in message and f"{attr}={value!r}" in message


def test_every_problem_is_listed_at_once():
    bad = SimpleNamespace(**{**SAFE, "disable_radix_cache": False, "tp_size": 4})
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(bad)
    assert "--disable-radix-cache" in str(exc.value) and "--tp-size 1" in str(exc.value)


@pytest.mark.engine
def test_stock_launch_without_the_flags_stops_with_the_reason(bundled_model_path):
    cmd = build_engine_command(
        EngineOptions(model_path=str(bundled_model_path), port=free_port(), dtype="float32")
    )
    cmd.remove("--disable-radix-cache")
    with heavy_process_lock(), tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("SGLang kept running with the radix cache on under raas")
        finally:
            # Whatever the launcher left behind (scheduler children) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
    assert proc.returncode != 0
    assert "--attention-backend raas needs: --disable-radix-cache" in text, text[-3000:]
