"""One KV-policy specification (raas_backend/policy_spec.py) for the gateway and the engine:
the same defaults, the same floor from the page size, the same error texts on both sides,
and a module the gateway can import without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raas_backend import policy_spec as spec
from raas_backend.policies import KVPolicyConfig, PolicyConfigError
from service.api.errors import OpenAIError
from service.chat import kv_policy
from service.chat.kv_policy import KvPolicyRequest, PolicyLimits
from service.server.settings import Settings


def test_gateway_and_engine_defaults_are_the_specification():
    settings = Settings()
    engine = KVPolicyConfig()
    assert settings.kv_default_policy == engine.name == spec.DEFAULT_POLICY
    assert settings.kv_default_budget_tokens == engine.budget_tokens == spec.DEFAULT_BUDGET_TOKENS
    assert settings.kv_default_alpha == engine.alpha == spec.DEFAULT_ALPHA
    assert settings.kv_min_budget_tokens == spec.min_budget_tokens(engine.page_size)
    assert settings.kv_max_budget_tokens == spec.MAX_BUDGET_TOKENS


def test_engine_budget_limit_default_is_the_gateway_cap():
    from raas_backend.sglang_plugin import runtime

    assert runtime.DEFAULT_MAX_BUDGET_TOKENS == spec.MAX_BUDGET_TOKENS


@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_budget_floor_follows_the_page_size(page_size, monkeypatch):
    monkeypatch.setenv("RAAS_PAGE_SIZE", str(page_size))
    floor = Settings().kv_min_budget_tokens
    assert floor == spec.MIN_BUDGET_PAGES * page_size
    KVPolicyConfig(page_size=page_size, budget_tokens=floor)
    with pytest.raises(PolicyConfigError):
        KVPolicyConfig(page_size=page_size, budget_tokens=floor - 1)
    with pytest.raises(ValueError, match="kv_min_budget_tokens"):
        Settings(kv_min_budget_tokens=floor - 1)
    assert Settings(kv_min_budget_tokens=floor + 1).kv_min_budget_tokens == floor + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "snapkv"),
        ("alpha", 1.0),
        ("alpha", -0.5),
        ("head_agg", "sum"),
        ("layer_agg", "min"),
        ("refresh_top_fraction", 1.5),
        ("recent_tokens", -1),
    ],
)
def test_both_sides_refuse_with_the_same_text(field, value):
    with pytest.raises(PolicyConfigError) as engine:
        KVPolicyConfig(**{field: value})
    with pytest.raises(OpenAIError) as gateway:
        kv_policy.resolve(
            KvPolicyRequest.model_validate({field: value}),
            PolicyLimits.for_caller(Settings(), None),
        )
    assert gateway.value.detail.param == f"kv_policy.{field}"
    assert gateway.value.detail.message == str(engine.value)


def test_the_specification_and_the_gateway_import_without_torch_or_a_circle():
    # Each gateway module that used to sit in the circle first, in a fresh interpreter.
    code = (
        "import sys\n"
        "import service.api.api_keys, service.server.settings, service.chat.kv_policy\n"
        "import service.app\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sglang')]\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
