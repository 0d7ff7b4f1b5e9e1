"""The raas backend refuses SGLang settings and models it cannot serve, at start.

The unit tests feed the check plain objects (and one real, resolved ServerArgs); the
engine test launches stock SGLang with `--attention-backend raas` but without
`--disable-radix-cache` and with `--page-size 16`, and expects the launcher to stop with
the message before any scheduler starts.
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
    FIELDS_READ,
    ModelFacts,
    UnsupportedServerArgs,
    after_check_server_args,
    check_loaded_model,
    check_server_args,
    model_facts,
)
from service.engine.command import EngineOptions, build_engine_command
from tests.support.sglang_server import free_port, heavy_process_lock

SAFE = dict(
    page_size=1,
    disable_radix_cache=True,
    disable_overlap_schedule=True,
    enable_mixed_chunk=False,
    tp_size=1,
    pp_size=1,
    speculative_algorithm=None,
    attention_backend="raas",
    prefill_attention_backend=None,
    decode_attention_backend=None,
    device="cpu",
    cuda_graph_config=None,
    model_path="dummy",
)


def settings(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{**SAFE, **changes})


def _graphs(decode: str) -> SimpleNamespace:
    return SimpleNamespace(decode=SimpleNamespace(backend=decode))


def test_every_field_read_is_in_the_safe_settings():
    assert set(FIELDS_READ) == set(SAFE)


def test_safe_settings_pass():
    check_server_args(settings())


@pytest.mark.parametrize(
    ("attr", "value", "flag"),
    [
        ("page_size", 16, "--page-size 1"),
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
        check_server_args(settings(**{attr: value}))
    message = str(exc.value)
    assert flag in message and f"{attr}={value!r}" in message


def test_every_problem_is_listed_at_once():
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(settings(disable_radix_cache=False, tp_size=4))
    assert "--disable-radix-cache" in str(exc.value) and "--tp-size 1" in str(exc.value)


def test_raas_prefill_with_another_decode_backend_is_refused():
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(settings(decode_attention_backend="torch_native"))
    message = str(exc.value)
    assert "--decode-attention-backend raas" in message and "decode='torch_native'" in message


@pytest.mark.parametrize(
    "backends",
    [
        dict(attention_backend="torch_native", decode_attention_backend="raas"),
        dict(
            attention_backend=None, prefill_attention_backend="fa3", decode_attention_backend="raas"
        ),
        dict(prefill_attention_backend="raas", decode_attention_backend="raas"),
    ],
)
def test_raas_decode_with_any_prefill_backend_passes(backends):
    check_server_args(settings(**backends))


def test_decode_cuda_graphs_on_a_gpu_need_a_backend_that_supports_them():
    gpu = settings(device="cuda", cuda_graph_config=_graphs("full"))
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(gpu, decode_cuda_graphs=False)
    assert "--cuda-graph-backend-decode disabled" in str(exc.value)
    check_server_args(gpu, decode_cuda_graphs=True)
    check_server_args(
        settings(device="cuda", cuda_graph_config=_graphs("disabled")), decode_cuda_graphs=False
    )
    # SGLang resolves a decode graph on the CPU too, but never captures one there.
    check_server_args(settings(cuda_graph_config=_graphs("full")), decode_cuda_graphs=False)


def test_the_launcher_asks_the_cuda_backend_class_for_decode_graphs(monkeypatch):
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    import raas_backend.sglang_plugin as plugin

    gpu = settings(device="cuda", cuda_graph_config=_graphs("full"))
    after_check_server_args(None, gpu)  # the FlashInfer-based backend captures decode graphs

    class NoGraphs(AttentionBackend):
        pass

    monkeypatch.setattr(plugin, "backend_class", lambda device: NoGraphs)
    with pytest.raises(UnsupportedServerArgs, match="--cuda-graph-backend-decode disabled"):
        after_check_server_args(None, gpu)


@pytest.mark.parametrize(
    ("facts", "named"),
    [
        (ModelFacts(mla=True), "multi-head latent attention"),
        (ModelFacts(encoder_decoder=True), "encoder-decoder"),
        (ModelFacts(hybrid_swa=True), "hybrid SWA"),
        (ModelFacts(chunked_attention=True), "chunked local attention"),
        (ModelFacts(sliding_window=4095), "sliding-window attention (window 4095)"),
    ],
)
def test_models_the_backend_cannot_decode_are_refused(facts, named):
    with pytest.raises(UnsupportedServerArgs) as exc:
        check_server_args(settings(), model=facts)
    assert named in str(exc.value) and "another --attention-backend" in str(exc.value)


@pytest.mark.parametrize("window", [None, -1])
def test_full_attention_models_pass(window):
    check_server_args(settings(), model=ModelFacts(architectures=("X",), sliding_window=window))


def test_model_facts_read_sglang_model_config():
    from sglang.srt.configs.model_config import AttentionArch

    config = SimpleNamespace(
        attention_arch=AttentionArch.MLA,
        hf_config=SimpleNamespace(architectures=["DeepseekV3ForCausalLM"]),
        is_encoder_decoder=False,
        is_hybrid_swa=True,
        attention_chunk_size=None,
    )
    facts = model_facts(config, sliding_window=128)
    assert facts == ModelFacts(("DeepseekV3ForCausalLM",), True, False, True, False, 128)


def test_loaded_model_with_a_sliding_window_is_refused():
    def runner(window):
        config = SimpleNamespace(attention_arch=None, hf_config=None)
        return SimpleNamespace(model_config=config, sliding_window_size=window)

    check_loaded_model(runner(None))
    with pytest.raises(UnsupportedServerArgs, match="window 4096"):
        check_loaded_model(runner(4096))


def test_the_launcher_check_ignores_servers_without_raas():
    after_check_server_args(None, settings(attention_backend="torch_native", tp_size=8))
    with pytest.raises(UnsupportedServerArgs):
        after_check_server_args(None, settings(prefill_attention_backend="raas", tp_size=8))


def test_the_launcher_check_reads_sglang_resolved_settings(bundled_model_path):
    """Raw ServerArgs fields are the operator's input: page_size None resolves to 1."""
    from sglang.srt.server_args import ServerArgs

    common = dict(model_path=str(bundled_model_path), device="cpu", attention_backend="raas")
    good = ServerArgs(**common, disable_radix_cache=True, disable_overlap_schedule=True)
    good.resolve_once()
    assert good.page_size is None
    after_check_server_args(None, good)  # the bundled (Llama) model passes the model checks

    bad = ServerArgs(**common, page_size=16, decode_attention_backend="torch_native")
    bad.resolve_once()
    with pytest.raises(UnsupportedServerArgs) as exc:
        after_check_server_args(None, bad)
    message = str(exc.value)
    for flag in ("--page-size 1", "--disable-radix-cache", "--decode-attention-backend raas"):
        assert flag in message


@pytest.mark.engine
def test_stock_launch_with_unsupported_flags_stops_in_the_launcher(bundled_model_path):
    """The launch fails before any scheduler starts (no weights loaded, no scheduler
    traceback), with one message naming every flag to change."""
    cmd = build_engine_command(
        EngineOptions(model_path=str(bundled_model_path), port=free_port(), dtype="float32")
    )
    cmd.remove("--disable-radix-cache")
    cmd += ["--page-size", "16"]
    with heavy_process_lock(), tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=180)
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
    assert (
        "UnsupportedServerArgs: --attention-backend raas needs: --page-size 1" in text
        and "; --disable-radix-cache (" in text
    ), text[-3000:]
    assert "Load weight begin" not in text and "Scheduler hit an exception" not in text
