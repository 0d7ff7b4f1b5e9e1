"""KVPolicyConfig validation, the server defaults from the environment, and the
per-request `custom_params.kv_policy` overlay."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.policies import POLICY_NAMES, KVPolicyConfig, PolicyConfigError
from raas_backend.policies.config import MIN_BUDGET_PAGES
from raas_backend.sglang_plugin.runtime import (
    CUSTOM_PARAMS_KEY,
    ENV_DEFAULTS,
    defaults_from_env,
    parse_custom_params,
)

FIELDS = (
    "name",
    "budget_tokens",
    "alpha",
    "head_agg",
    "layer_agg",
    "refresh_top_fraction",
    "recent_tokens",
    "quest_selection",
    "page_size",
)


def _rejects(field: str, **kwargs) -> PolicyConfigError:
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig(**kwargs)
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"kv_policy.{field}: ")
    assert isinstance(err, ValueError)
    return err


def test_defaults_are_valid_and_round_trip():
    config = KVPolicyConfig()
    assert config.name == "raas"
    assert set(config.to_dict()) == set(FIELDS)
    assert KVPolicyConfig(**config.to_dict()) == config
    assert config.budget_pages == config.budget_tokens // config.page_size


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_name_is_accepted(name):
    assert KVPolicyConfig(name=name).name == name


@pytest.mark.parametrize("bad", ["", "RAAS", "snapkv", None, 1, ["raas"]])
def test_name_rejected(bad):
    _rejects("name", name=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.0, 16.0, "16", True, False, None])
def test_page_size_rejected(bad):
    _rejects("page_size", page_size=bad)


@pytest.mark.parametrize("page_size", [1, 2, 7, 16, 64])
def test_budget_minimum_is_two_pages(page_size):
    low = MIN_BUDGET_PAGES * page_size
    assert KVPolicyConfig(page_size=page_size, budget_tokens=low).budget_tokens == low
    err = _rejects("budget_tokens", page_size=page_size, budget_tokens=low - 1)
    assert str(low) in str(err)


@pytest.mark.parametrize("bad", [0, -32, 31, 1024.0, "1024", True, None])
def test_budget_tokens_rejected(bad):
    _rejects("budget_tokens", budget_tokens=bad)


@pytest.mark.parametrize("good", [0, 0.0, 1e-4, 0.1, 0.5, 0.999])
def test_alpha_accepted(good):
    assert KVPolicyConfig(alpha=good).alpha == good


@pytest.mark.parametrize(
    "bad", [-1e-9, 1.0, 1, 2.5, math.nan, math.inf, -math.inf, True, False, "0.1", None]
)
def test_alpha_rejected(bad):
    _rejects("alpha", alpha=bad)


@pytest.mark.parametrize("field", ["head_agg", "layer_agg"])
@pytest.mark.parametrize("bad", ["sum", "MAX", "", None, 1])
def test_aggregation_rejected(field, bad):
    _rejects(field, **{field: bad})


@pytest.mark.parametrize("field", ["head_agg", "layer_agg"])
@pytest.mark.parametrize("good", ["max", "mean"])
def test_aggregation_accepted(field, good):
    assert getattr(KVPolicyConfig(**{field: good}), field) == good


@pytest.mark.parametrize("good", [0, 0.0, 0.05, 0.5, 1, 1.0])
def test_refresh_top_fraction_accepted(good):
    assert KVPolicyConfig(refresh_top_fraction=good).refresh_top_fraction == good


@pytest.mark.parametrize("bad", [-0.1, 1.01, math.nan, math.inf, True, False, "0.5", None])
def test_refresh_top_fraction_rejected(bad):
    _rejects("refresh_top_fraction", refresh_top_fraction=bad)


@pytest.mark.parametrize("bad", [-1, 1.0, "8", True, False, None])
def test_recent_tokens_rejected(bad):
    _rejects("recent_tokens", recent_tokens=bad)


def test_quest_selection_defaults_to_per_kv_group_and_is_checked():
    assert KVPolicyConfig(name="quest").quest_selection == "kv_group"
    assert KVPolicyConfig(name="quest", quest_selection="layer").quest_selection == "layer"
    for bad in ("head", "KV_GROUP", "", None, 1):
        _rejects("quest_selection", name="quest", quest_selection=bad)
    # A kv_policy without the field (every request before it existed) keeps working.
    merged = KVPolicyConfig.from_dict({"name": "quest", "budget_tokens": 64}, KVPolicyConfig())
    assert merged.quest_selection == "kv_group"
    assert (
        KVPolicyConfig.from_dict(
            {"name": "quest", "quest_selection": "layer"}, KVPolicyConfig()
        ).quest_selection
        == "layer"
    )


def test_h2o_recent_window_must_leave_room_for_a_page():
    ok = KVPolicyConfig(name="h2o", budget_tokens=64, page_size=16, recent_tokens=48)
    assert ok.recent_tokens == 48
    err = _rejects("recent_tokens", name="h2o", budget_tokens=64, page_size=16, recent_tokens=49)
    assert "48" in str(err)
    # Other policies ignore the window, so it is not tied to their budget.
    assert KVPolicyConfig(name="raas", budget_tokens=64, recent_tokens=1000).recent_tokens == 1000


def test_config_is_frozen():
    config = KVPolicyConfig()
    with pytest.raises(AttributeError):
        config.alpha = 0.5  # type: ignore[misc]


# -- from_dict -----------------------------------------------------------------------


def test_from_dict_none_is_the_defaults():
    defaults = KVPolicyConfig(name="streaming", budget_tokens=256)
    assert KVPolicyConfig.from_dict(None, defaults) is defaults


def test_from_dict_overlays_only_given_fields():
    defaults = KVPolicyConfig(budget_tokens=256, alpha=0.2, page_size=8)
    config = KVPolicyConfig.from_dict({"name": "h2o", "recent_tokens": 32}, defaults)
    assert config == KVPolicyConfig(
        name="h2o", budget_tokens=256, alpha=0.2, page_size=8, recent_tokens=32
    )


def test_from_dict_h2o_shrinks_an_unasked_recent_window_to_a_small_budget():
    """The server's default window (64) must not fail `{"name": "h2o", "budget_tokens": 64}`."""
    defaults = KVPolicyConfig()  # recent_tokens 64, page 16
    config = KVPolicyConfig.from_dict({"name": "h2o", "budget_tokens": 64}, defaults)
    assert config.recent_tokens == 48
    big = KVPolicyConfig.from_dict({"name": "h2o", "budget_tokens": 512}, defaults)
    assert big.recent_tokens == 64  # fits: unchanged
    # A window the caller sets is still checked, not silently shrunk.
    with pytest.raises(PolicyConfigError, match="recent_tokens"):
        KVPolicyConfig.from_dict(
            {"name": "h2o", "budget_tokens": 64, "recent_tokens": 64}, defaults
        )


def test_error_on_a_non_object_names_kv_policy_itself():
    with pytest.raises(PolicyConfigError) as exc:
        KVPolicyConfig.from_dict("raas", KVPolicyConfig())  # type: ignore[arg-type]
    assert str(exc.value).startswith("kv_policy: expected an object")


@pytest.mark.parametrize("key", ["budget", "Alpha", "kv_policy", "", "page_size"])
def test_from_dict_unknown_key_rejected(key):
    # page_size is an engine setting: a request may not choose it.
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig.from_dict({key: 1}, KVPolicyConfig())
    assert info.value.field == key
    assert "unknown field" in str(info.value)


def test_from_dict_non_string_key_rejected():
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig.from_dict({1: 2}, KVPolicyConfig())
    assert info.value.field == "1"


@pytest.mark.parametrize("bad", [[], "raas", 3, [("name", "raas")]])
def test_from_dict_non_object_rejected(bad):
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig.from_dict(bad, KVPolicyConfig())
    assert info.value.field == ""


def test_from_dict_validates_the_result():
    defaults = KVPolicyConfig(page_size=16)
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig.from_dict({"budget_tokens": 16}, defaults)
    assert info.value.field == "budget_tokens"
    with pytest.raises(PolicyConfigError) as info:
        KVPolicyConfig.from_dict({"alpha": float("nan")}, defaults)
    assert info.value.field == "alpha"


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(POLICY_NAMES),
    page_size=st.integers(1, 32),
    budget=st.integers(-10, 600),
    alpha=st.floats(allow_nan=True, allow_infinity=True),
    frac=st.floats(-0.5, 1.5),
    recent=st.integers(-5, 600),
)
def test_validation_matches_the_documented_ranges(name, page_size, budget, alpha, frac, recent):
    """Accept exactly the documented ranges; otherwise name the first offending field."""
    expected = None
    if budget < MIN_BUDGET_PAGES * page_size:
        expected = "budget_tokens"
    elif not (math.isfinite(alpha) and 0.0 <= alpha < 1.0):
        expected = "alpha"
    elif not 0.0 <= frac <= 1.0:
        expected = "refresh_top_fraction"
    elif recent < 0 or (name == "h2o" and recent > budget - page_size):
        expected = "recent_tokens"
    kwargs = dict(
        name=name,
        page_size=page_size,
        budget_tokens=budget,
        alpha=alpha,
        refresh_top_fraction=frac,
        recent_tokens=recent,
    )
    if expected is None:
        config = KVPolicyConfig(**kwargs)
        assert config.budget_pages >= MIN_BUDGET_PAGES
    else:
        _rejects(expected, **kwargs)


# -- defaults_from_env --------------------------------------------------------------


def test_env_empty_gives_the_built_in_defaults():
    assert defaults_from_env({}) == KVPolicyConfig()


def test_env_unrelated_variables_ignored():
    assert defaults_from_env({"PATH": "/bin", "RAAS_OTHER": "x"}) == KVPolicyConfig()


def test_env_every_variable_is_read():
    environ = {
        "RAAS_DEFAULT_POLICY": "h2o",
        "RAAS_DEFAULT_BUDGET_TOKENS": "256",
        "RAAS_DEFAULT_ALPHA": "0.25",
        "RAAS_DEFAULT_HEAD_AGG": "mean",
        "RAAS_DEFAULT_LAYER_AGG": "mean",
        "RAAS_DEFAULT_REFRESH_TOP_FRACTION": "0.5",
        "RAAS_DEFAULT_RECENT_TOKENS": "32",
        "RAAS_PAGE_SIZE": "8",
    }
    assert set(environ) == set(ENV_DEFAULTS)
    assert defaults_from_env(environ) == KVPolicyConfig(
        name="h2o",
        budget_tokens=256,
        alpha=0.25,
        head_agg="mean",
        layer_agg="mean",
        refresh_top_fraction=0.5,
        recent_tokens=32,
        page_size=8,
    )


def test_env_reads_os_environ_by_default(monkeypatch):
    for var in ENV_DEFAULTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAAS_DEFAULT_POLICY", "streaming")
    monkeypatch.setenv("RAAS_DEFAULT_BUDGET_TOKENS", "512")
    assert defaults_from_env() == KVPolicyConfig(name="streaming", budget_tokens=512)


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("RAAS_DEFAULT_BUDGET_TOKENS", "1.5", "budget_tokens"),
        ("RAAS_DEFAULT_BUDGET_TOKENS", "", "budget_tokens"),
        ("RAAS_PAGE_SIZE", "sixteen", "page_size"),
        ("RAAS_DEFAULT_ALPHA", "high", "alpha"),
        ("RAAS_DEFAULT_RECENT_TOKENS", "1e2", "recent_tokens"),
        ("RAAS_DEFAULT_REFRESH_TOP_FRACTION", "", "refresh_top_fraction"),
    ],
)
def test_env_unparsable_value_names_the_field(var, value, field):
    with pytest.raises(PolicyConfigError) as info:
        defaults_from_env({var: value})
    assert info.value.field == field
    assert var in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("RAAS_DEFAULT_POLICY", "snapkv", "name"),
        ("RAAS_DEFAULT_ALPHA", "nan", "alpha"),
        ("RAAS_DEFAULT_ALPHA", "inf", "alpha"),
        ("RAAS_DEFAULT_ALPHA", "1", "alpha"),
        ("RAAS_DEFAULT_BUDGET_TOKENS", "16", "budget_tokens"),
        ("RAAS_PAGE_SIZE", "0", "page_size"),
        ("RAAS_DEFAULT_HEAD_AGG", "sum", "head_agg"),
        ("RAAS_DEFAULT_REFRESH_TOP_FRACTION", "nan", "refresh_top_fraction"),
    ],
)
def test_env_out_of_range_value_names_the_field(var, value, field):
    with pytest.raises(PolicyConfigError) as info:
        defaults_from_env({var: value})
    assert info.value.field == field


def test_env_page_size_changes_the_budget_floor():
    # The budget floor follows the page size of the same environment.
    environ = {"RAAS_PAGE_SIZE": "64", "RAAS_DEFAULT_BUDGET_TOKENS": "100"}
    with pytest.raises(PolicyConfigError) as info:
        defaults_from_env(environ)
    assert info.value.field == "budget_tokens"
    environ["RAAS_DEFAULT_BUDGET_TOKENS"] = "128"
    assert defaults_from_env(environ).page_size == 64


# -- parse_custom_params ------------------------------------------------------------


DEFAULTS = KVPolicyConfig(name="raas", budget_tokens=512, alpha=0.1, page_size=16)


@pytest.mark.parametrize("params", [None, {}, {"other": 1}, {CUSTOM_PARAMS_KEY: None}])
def test_custom_params_without_policy_use_the_defaults(params):
    assert parse_custom_params(params, DEFAULTS) is DEFAULTS


def test_custom_params_overlay():
    config = parse_custom_params(
        {CUSTOM_PARAMS_KEY: {"name": "quest", "budget_tokens": 64}, "other": 1}, DEFAULTS
    )
    assert config == KVPolicyConfig(name="quest", budget_tokens=64, alpha=0.1, page_size=16)


@pytest.mark.parametrize("bad", ["kv_policy", 1, ["kv_policy"]])
def test_custom_params_not_an_object(bad):
    with pytest.raises(PolicyConfigError) as info:
        parse_custom_params(bad, DEFAULTS)
    assert info.value.field == ""


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"budget_tokens": 8}, "budget_tokens"),
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"name": "h2o", "recent_tokens": 1000}, "recent_tokens"),
        ({"page_size": 4}, "page_size"),
        ({"bogus": 1}, "bogus"),
        ("raas", ""),
    ],
)
def test_custom_params_bad_policy(policy, field):
    with pytest.raises(PolicyConfigError) as info:
        parse_custom_params({CUSTOM_PARAMS_KEY: policy}, DEFAULTS)
    assert info.value.field == field
