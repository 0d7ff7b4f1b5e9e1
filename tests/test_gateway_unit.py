"""Gateway pieces that need no engine and no socket: settings, the kv_policy extension,
API keys, admission control, error shapes, metrics, request checks, the CLI surface."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from raas_backend import policy_spec
from service.api import errors
from service.api.api_keys import ApiKey, ApiKeyError, KeyStore, load_key_store, parse_keys_text
from service.api.schemas import ChatCompletionRequest
from service.chat import kv_policy
from service.chat import request as chat_request
from service.chat.admission import AdmissionController, AdmissionRejected, RejectReason
from service.chat.kv_policy import EffectivePolicy, KvCacheUsage, KvPolicyRequest, PolicyLimits
from service.engine.model_config import kv_bytes_per_token
from service.server.metrics import GatewayMetrics, parse_engine_metrics
from service.server.settings import Settings

MODEL = "smollm2-135m-instruct"


DEFAULT_ALPHA = Settings.model_fields["kv_default_alpha"].default


def settings(**overrides) -> Settings:
    return Settings(engine_mode="remote", **overrides)


def limits(key: ApiKey | None = None, **overrides) -> PolicyLimits:
    return PolicyLimits.for_caller(settings(**overrides), key)


def param_of(exc_info: pytest.ExceptionInfo[errors.OpenAIError]) -> str | None:
    return exc_info.value.detail.param


# --- settings -------------------------------------------------------------------------


def test_settings_read_raas_env(monkeypatch):
    monkeypatch.setenv("RAAS_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("RAAS_KV_DEFAULT_POLICY", "h2o")
    monkeypatch.setenv("RAAS_ENGINE_EXTRA_ARGS", '["--log-level", "warning"]')
    s = Settings()
    assert s.max_in_flight == 3
    assert s.kv_default_policy == "h2o"
    assert s.engine_extra_args == ["--log-level", "warning"]
    assert s.upstream_url == "http://127.0.0.1:30000"


def test_settings_remote_url_and_validation():
    assert settings(engine_url="http://127.0.0.1:9/").upstream_url == "http://127.0.0.1:9"
    with pytest.raises(ValidationError, match="http"):
        settings(engine_url="127.0.0.1:9")
    with pytest.raises(ValidationError, match="kv_default_budget_tokens"):
        settings(kv_default_budget_tokens=10_000, kv_max_budget_tokens=8192)
    with pytest.raises(ValidationError, match="alpha"):
        settings(kv_default_alpha=1.0)
    with pytest.raises(ValidationError, match="kv_default_policy"):
        settings(kv_allowed_policies=["dense"], kv_default_policy="raas")


# --- kv_policy --------------------------------------------------------------------------


def test_defaults_fill_missing_fields():
    eff = kv_policy.resolve(KvPolicyRequest(), limits())
    assert eff == EffectivePolicy(
        name="raas", budget_tokens=policy_spec.DEFAULT_BUDGET_TOKENS, alpha=DEFAULT_ALPHA
    )
    eff = kv_policy.resolve(KvPolicyRequest(name="h2o", budget_tokens=256), limits())
    # Only raas reads alpha: the others carry none.
    assert (eff.name, eff.budget_tokens, eff.alpha) == ("h2o", 256, None)


def test_dense_has_no_budget_and_engine_gets_only_set_fields():
    eff = kv_policy.resolve(KvPolicyRequest(name="dense"), limits())
    assert eff.budget_tokens is None and eff.alpha is None
    assert eff.for_engine() == {"name": "dense"}
    raas = kv_policy.resolve(KvPolicyRequest(name="raas", recent_tokens=0), limits())
    assert raas.for_engine() == {
        "name": "raas",
        "budget_tokens": policy_spec.DEFAULT_BUDGET_TOKENS,
        "alpha": DEFAULT_ALPHA,
        "recent_tokens": 0,
    }


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (KvPolicyRequest(name="lru"), "kv_policy.name"),
        (KvPolicyRequest(budget_tokens=8), "kv_policy.budget_tokens"),
        (KvPolicyRequest(budget_tokens=100_000), "kv_policy.budget_tokens"),
        (KvPolicyRequest(alpha=1.0), "kv_policy.alpha"),
        (KvPolicyRequest(alpha=-0.1), "kv_policy.alpha"),
        (KvPolicyRequest(alpha=float("nan")), "kv_policy.alpha"),
        (KvPolicyRequest(head_agg="sum"), "kv_policy.head_agg"),
        (KvPolicyRequest(refresh_top_fraction=1.5), "kv_policy.refresh_top_fraction"),
        (KvPolicyRequest(recent_tokens=-1), "kv_policy.recent_tokens"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(request_, param):
    with pytest.raises(errors.OpenAIError) as exc:
        kv_policy.resolve(request_, limits())
    assert exc.value.status_code == 400
    assert param_of(exc) == param


def test_key_cap_narrows_server_cap_and_defaults():
    key = ApiKey(
        key=SecretStr("k"),
        max_budget_tokens=512,
        default_policy="streaming",
        allowed_policies=("streaming", "dense"),
    )
    lim = limits(key)
    assert lim.max_budget == 512 and lim.default_budget == 512
    eff = kv_policy.resolve(KvPolicyRequest(), lim)
    assert (eff.name, eff.budget_tokens) == ("streaming", 512)
    with pytest.raises(errors.OpenAIError, match="API key cap") as exc:
        kv_policy.resolve(KvPolicyRequest(budget_tokens=513), lim)
    assert param_of(exc) == "kv_policy.budget_tokens"
    with pytest.raises(errors.OpenAIError) as exc:
        kv_policy.resolve(KvPolicyRequest(name="raas"), lim)
    assert exc.value.detail.code == "policy_not_allowed"


def test_key_cap_cannot_exceed_server_cap():
    key = ApiKey(key=SecretStr("k"), max_budget_tokens=1_000_000)
    assert limits(key, kv_max_budget_tokens=4096).max_budget == 4096


def test_header_forms():
    parsed = kv_policy.parse_header("name=raas, budget_tokens=256 ,alpha=0.05")
    assert parsed == KvPolicyRequest(name="raas", budget_tokens=256, alpha=0.05)
    assert kv_policy.parse_header('{"name": "quest", "budget_tokens": 64}') == KvPolicyRequest(
        name="quest", budget_tokens=64
    )
    assert kv_policy.parse_header(None) == KvPolicyRequest()


@pytest.mark.parametrize(
    ("header", "param"),
    [
        ("name", "X-KV-Policy"),
        ("budget_tokens=lots", "kv_policy.budget_tokens"),
        ("alpha=high", "kv_policy.alpha"),
        ("colour=blue", "kv_policy.colour"),
        ("{not json", "X-KV-Policy"),
        ("name=raas,name=dense", "X-KV-Policy"),
    ],
)
def test_bad_header_is_400(header, param):
    with pytest.raises(errors.OpenAIError) as exc:
        kv_policy.parse_header(header)
    assert exc.value.status_code == 400 and param_of(exc) == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("raas", "kv_policy"),
        ({"budget_tokens": "many"}, "kv_policy.budget_tokens"),
        ({"budget_tokens": 1.5}, "kv_policy.budget_tokens"),
        ({"budget_tokens": True}, "kv_policy.budget_tokens"),
        ({"nme": "raas"}, "kv_policy.nme"),
    ],
)
def test_bad_body_field_is_400(body, param):
    with pytest.raises(errors.OpenAIError) as exc:
        kv_policy.parse_body_field(body)
    assert exc.value.status_code == 400 and param_of(exc) == param


def test_body_fields_win_over_header():
    eff = kv_policy.resolve_request(
        {"budget_tokens": 128}, "name=h2o,budget_tokens=999,alpha=0.2", limits()
    )
    assert (eff.name, eff.budget_tokens, eff.alpha) == ("h2o", 128, None)


def test_usage_merge_keeps_effective_values_and_takes_engine_numbers():
    eff = EffectivePolicy(name="raas", budget_tokens=256, alpha=0.1)
    empty = KvCacheUsage.merge(eff, None)
    assert empty.model_dump() == {
        "policy": "raas",
        "budget_tokens": 256,
        "alpha": 0.1,
        "peak_retained_tokens": None,
        "dense_equivalent_tokens": None,
        "evicted_pages": None,
    }
    engine = {"policy": "dense", "peak_retained_tokens": 300, "dense_equivalent_tokens": 900}
    merged = KvCacheUsage.merge(eff, {**engine, "evicted_pages": True})
    assert merged.policy == "raas" and merged.peak_retained_tokens == 300
    assert merged.evicted_pages is None and merged.engine_reported


# --- API keys -------------------------------------------------------------------------


def test_keys_json_and_text_formats(tmp_path):
    digest = hashlib.sha256(b"hashed-secret").hexdigest()
    doc = {
        "keys": [
            {"key": "sk-a", "name": "a", "max_concurrency": 2, "max_budget_tokens": 1024},
            {"key_sha256": digest, "name": "b"},
        ]
    }
    store = KeyStore(parse_keys_text(json.dumps(doc)))
    assert store.lookup("sk-a").max_concurrency == 2
    assert store.lookup("hashed-secret").name == "b"
    assert store.lookup("sk-nope") is None

    text = "# team keys\nsk-c name=c max_concurrency=1 allowed_policies=raas,dense\n\nsk-d\n"
    keys = parse_keys_text(text)
    assert keys[0].allowed_policies == ("raas", "dense") and keys[1].label.startswith("key-")

    path = tmp_path / "keys.txt"
    path.write_text(text)
    assert len(load_key_store(path, SecretStr("sk-e, sk-f"))) == 4
    assert not load_key_store(None, None).enabled


@pytest.mark.parametrize(
    "text",
    [
        '{"keys": [{"name": "no-secret"}]}',
        '{"keys": [{"key": "x", "max_concurrency": 0}]}',
        '{"keys": [{"key": "x", "default_policy": "lru"}]}',
        "sk-a max_concurrency",
        "sk-a\nsk-a",
        "{broken",
    ],
)
def test_bad_keys_files_fail_loudly(text):
    with pytest.raises(ApiKeyError):
        KeyStore(parse_keys_text(text))


def test_missing_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(ApiKeyError, match="cannot read"):
        load_key_store(tmp_path / "absent.json", None)


# --- admission --------------------------------------------------------------------------


def test_admission_fifo_queue_full_and_handoff():
    async def scenario():
        ctl = AdmissionController(max_in_flight=1, max_queue=1, queue_timeout_s=5)
        first = await ctl.acquire()
        waiter = asyncio.create_task(ctl.acquire())
        await asyncio.sleep(0)
        assert ctl.queued == 1
        with pytest.raises(AdmissionRejected) as exc:
            await ctl.acquire()
        assert exc.value.reason is RejectReason.QUEUE_FULL
        first.release()
        second = await waiter
        assert ctl.in_flight == 1 and ctl.queued == 0
        second.release()
        second.release()  # idempotent
        assert ctl.in_flight == 0

    asyncio.run(scenario())


def test_admission_timeout_and_cancel_leave_no_leak():
    async def scenario():
        ctl = AdmissionController(max_in_flight=1, max_queue=2, queue_timeout_s=0.05)
        held = await ctl.acquire("k", 5)
        with pytest.raises(AdmissionRejected) as exc:
            await ctl.acquire("k", 5)
        assert exc.value.reason is RejectReason.QUEUE_TIMEOUT
        task = asyncio.create_task(ctl.acquire("k", 5))
        while ctl.queued == 0:  # until it waits in the queue
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ctl.queued == 0 and ctl._per_key["k"] == 1
        held.release()
        assert ctl.in_flight == 0 and not ctl._per_key

    asyncio.run(scenario())


def test_admission_per_key_limit():
    async def scenario():
        ctl = AdmissionController(max_in_flight=10, max_queue=10, queue_timeout_s=1)
        a = await ctl.acquire("alice", 1)
        with pytest.raises(AdmissionRejected) as exc:
            await ctl.acquire("alice", 1)
        assert exc.value.reason is RejectReason.KEY_CONCURRENCY
        b = await ctl.acquire("bob", 1)
        a.release()
        b.release()

    asyncio.run(scenario())


# --- errors -----------------------------------------------------------------------------


def test_error_shape_and_engine_translation():
    body = errors.overloaded("busy", "queue_full", 3)
    assert body.body() == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    assert body.headers["Retry-After"] == "3"
    engine = {
        "object": "error",
        "message": "kv_policy.recent_tokens: expected at most 48, got 64",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    translated = errors.from_engine_payload(400, engine)
    assert translated.status_code == 400
    assert translated.detail.param == "kv_policy.recent_tokens"
    assert errors.from_engine_payload(500, {"message": "boom"}).status_code == 502
    assert errors.from_engine_payload(503, "down").status_code == 503


# --- request checks ---------------------------------------------------------------------


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"model": "gpt-4"}, 404, "model"),
        ({"messages": []}, 400, "messages"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
        ({"n": 99}, 400, "n"),
        ({"temperature": 2.5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_logprobs": 5}, 400, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"min_p": 1.5}, 400, "min_p"),
        ({"repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"top_k": 0}, 400, "top_k"),
        ({"min_tokens": -1}, 400, "min_tokens"),
        ({"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ],
)
def test_value_checks(fields, status, param):
    with pytest.raises(errors.OpenAIError) as exc:
        chat_request.check_values(chat(**fields), settings())
    assert exc.value.status_code == status and param_of(exc) == param


def test_upstream_body_carries_rid_policy_and_usage_request():
    s = settings(max_tokens_limit=64, default_max_tokens=32)
    req = chat(stream=True, top_k=5, store=True, kv_policy={"name": "dense"})
    chat_request.check_values(req, s)
    eff = EffectivePolicy(name="raas", budget_tokens=128, alpha=0.1)
    body = chat_request.upstream_body(req, eff, "chatcmpl-x", s)
    assert body["rid"] == "chatcmpl-x"
    assert body["custom_params"] == {
        "kv_policy": {"name": "raas", "budget_tokens": 128, "alpha": 0.1}
    }
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 32 and body["top_k"] == 5
    assert "kv_policy" not in body and "store" not in body
    plain = chat_request.upstream_body(chat(), eff, "chatcmpl-y", settings(default_max_tokens=None))
    assert "max_completion_tokens" not in plain and "stream_options" not in plain
    capped = chat_request.upstream_body(chat(), eff, "chatcmpl-z", settings())
    assert capped["max_completion_tokens"] == 1024


def test_a_key_default_cap_above_the_server_limit_fails_at_load(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-a default_max_tokens=5000\n")
    with pytest.raises(ApiKeyError, match="default_max_tokens=5000"):
        load_key_store(keys, None, max_tokens_limit=4096)
    assert len(load_key_store(keys, None, max_tokens_limit=8192)) == 1


# --- metrics and model config -----------------------------------------------------------


def test_kv_bytes_per_token_of_the_bundled_architecture():
    config = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "dtype": "float32",
    }
    assert kv_bytes_per_token(config) == 30 * 3 * 64 * 2 * 4
    assert kv_bytes_per_token(config, "bfloat16") == 30 * 3 * 64 * 2 * 2
    assert kv_bytes_per_token({"num_hidden_layers": 2}) is None


ENGINE_METRICS = """\
# HELP sglang:num_running_reqs running
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{tp_rank="0"} 2.0
# HELP sglang:kv_used_tokens used
# TYPE sglang:kv_used_tokens gauge
sglang:kv_used_tokens{tp_rank="0"} 100.0
# HELP sglang:prompt_tokens_total prompt
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{is_streaming="false"} 10.0
sglang:prompt_tokens_total{is_streaming="true"} 5.0
"""


def test_engine_metrics_are_summed_and_reexported():
    parsed = parse_engine_metrics(ENGINE_METRICS)
    assert parsed["sglang:num_running_reqs"] == 2.0
    assert parsed["sglang:prompt_tokens"] == 15.0
    m = GatewayMetrics(bytes_per_kv_token=10)
    m.engine.update(ENGINE_METRICS)
    assert m.registry.get_sample_value("raas_engine_kv_used_bytes") == 1000.0
    assert m.registry.get_sample_value("raas_engine_prompt_tokens_total") == 15.0
    m.engine.update(None)
    assert m.registry.get_sample_value("raas_engine_up") == 0.0
    assert m.registry.get_sample_value("raas_engine_running_requests") is None


def test_unparsable_engine_metrics_count_as_unavailable():
    m = GatewayMetrics(bytes_per_kv_token=10)
    m.engine.update(ENGINE_METRICS)
    m.engine.update('sglang:kv_used_tokens{\x8b\x08"} 1\n')  # e.g. a gzip body read as text
    assert m.registry.get_sample_value("raas_engine_up") == 0.0
    assert m.registry.get_sample_value("raas_engine_kv_used_bytes") is None


def test_kv_metrics_by_policy():
    m = GatewayMetrics(bytes_per_kv_token=100)
    eff = EffectivePolicy(name="raas", budget_tokens=256, alpha=0.1)
    for retained, dense in ((250, 1000), (250, 500)):
        kv = KvCacheUsage.merge(
            eff,
            {
                "peak_retained_tokens": retained,
                "dense_equivalent_tokens": dense,
                "evicted_pages": 3,
            },
        )
        m.record_kv(kv)
    m.record_kv(
        KvCacheUsage.merge(EffectivePolicy(name="dense", budget_tokens=None, alpha=None), None)
    )
    get = m.registry.get_sample_value
    assert get("raas_kv_retained_tokens_total", {"policy": "raas"}) == 500
    assert get("raas_kv_dense_equivalent_bytes_total", {"policy": "raas"}) == 150_000
    assert get("raas_kv_evicted_pages_total", {"policy": "raas"}) == 6
    assert get("raas_kv_savings_ratio", {"policy": "raas"}) == pytest.approx(1 - 500 / 1500)
    assert get("raas_kv_requests_total", {"policy": "dense"}) == 1
    # Counted, but without a report it adds nothing to the reported series (pre-created
    # at zero for every policy, so that rate() sees the first report).
    assert get("raas_kv_reported_requests_total", {"policy": "dense"}) == 0
    assert get("raas_kv_reported_requests_total", {"policy": "raas"}) == 2
    for policy in ("raas", "streaming", "h2o", "quest", "dense"):
        assert get("raas_kv_retained_bytes_total", {"policy": policy}) is not None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_metric_names_pass_promtool():
    from prometheus_client import generate_latest

    m = GatewayMetrics(bytes_per_kv_token=100)
    m.engine.update(ENGINE_METRICS)
    m.record_outcome(policy="raas", stream=True, outcome="success")
    m.http_requests.labels("GET", "/v1/models", "200").inc()
    m.record_success(
        policy="raas",
        stream=True,
        e2e_s=1.0,
        ttft_s=0.1,
        prompt_tokens=5,
        completion_tokens=10,
        kv=KvCacheUsage.merge(
            EffectivePolicy(name="raas", budget_tokens=64, alpha=0.1),
            {"peak_retained_tokens": 64, "dense_equivalent_tokens": 128, "evicted_pages": 4},
        ),
    )
    out = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(m.registry),
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_metrics_module_docstring_lists_every_metric():
    import service.server.metrics as metrics_module

    m = GatewayMetrics(bytes_per_kv_token=1)
    m.engine.update(ENGINE_METRICS)
    doc = metrics_module.__doc__ or ""
    names = {metric.name for metric in m.registry.collect()}
    missing = [n for n in names if n not in doc]
    assert not missing, f"metrics not documented in service/server/metrics.py: {missing}"


# --- CLI --------------------------------------------------------------------------------


def test_cli_help_and_prepare_model(bundled_model_path: Path):
    helped = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "prepare-model" in helped.stdout and "serve" in helped.stdout
    served = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--engine-mode" in served.stdout and "RAAS_" in served.stdout
    prepared = subprocess.run(
        [sys.executable, "-m", "service.cli", "prepare-model"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prepared.returncode == 0, prepared.stderr
    assert Path(prepared.stdout.strip()) == bundled_model_path


def test_cli_rejects_bad_configuration():
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--engine-url", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "engine_url" in out.stderr


def test_cli_kv_defaults_reach_the_settings():
    """The flags are validated with the rest: a default budget over the cap is refused."""
    out = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "serve",
            "--kv-default-policy", "streaming",
            "--kv-default-budget-tokens", "4096",
            "--kv-max-budget-tokens", "1024",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "expected kv_default_budget_tokens in [32, 1024], got 4096" in out.stderr


@pytest.mark.parametrize(
    "line",
    [
        "sk-a max_budget_tokens=16",  # under the server minimum: would be widened to 32
        "sk-a default_budget_tokens=8",  # every request without a budget would be a 400
        "sk-a default_budget_tokens=9000",  # above the server maximum
    ],
)
def test_key_budgets_outside_the_server_range_fail_at_load(tmp_path, line):
    path = tmp_path / "keys.txt"
    path.write_text(line + "\n")
    assert len(load_key_store(path, None)) == 1  # no range given: not checked
    with pytest.raises(ApiKeyError, match="outside the server's budget range"):
        load_key_store(path, None, budget_range=(32, 8192))


def test_key_budgets_inside_the_server_range_load(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("sk-a max_budget_tokens=32 default_budget_tokens=32\n")
    assert len(load_key_store(path, None, budget_range=(32, 8192))) == 1


def test_non_streamed_timings_come_from_the_engine_and_never_reach_the_client():
    eff = EffectivePolicy(name="raas", budget_tokens=128, alpha=0.1)
    body = chat_request.upstream_body(chat(), eff, "rid-1", settings())
    assert body["return_meta_info"] is True
    data = {
        "choices": [
            {"index": 0, "meta_info": {"e2e_latency": 0.9, "first_token_latency": 0.4}},
            {"index": 1, "meta_info": {"e2e_latency": 0.7, "first_token_latency": 0.1}},
        ]
    }
    assert chat_request.engine_decode_s(data) == pytest.approx(0.6)
    assert data == {"choices": [{"index": 0}, {"index": 1}]}
    # An engine without --enable-metrics reports no first-token time: nothing recorded.
    assert chat_request.engine_decode_s({"choices": [{"meta_info": {"e2e_latency": 1}}]}) is None
    streamed = chat_request.upstream_body(chat(stream=True), eff, "rid-2", settings())
    assert "return_meta_info" not in streamed
