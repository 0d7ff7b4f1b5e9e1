"""The plugin's hooks into SGLang internals, checked against the installed SGLang.

Mismatches are simulated with a fake module (never by editing SGLang): a target that is
gone, a parameter renamed or added, an async generator that became a plain function.
"""

from __future__ import annotations

import inspect
import sys
import types

import pytest

from raas_backend.sglang_plugin import hook_table
from raas_backend.sglang_plugin.hook_table import (
    HOOKS,
    PATCHES,
    TARGET_SGLANG_VERSION,
    Hook,
    HookTableError,
    Kind,
    check_hooks,
    problems_of,
)
from raas_backend.sglang_plugin.scheduler_hooks import around_free_kv_row

FAKE = "raas_fake_sglang_internals"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.target.removeprefix("sglang.srt."))
def test_declared_hook_matches_the_installed_sglang(hook: Hook):
    assert problems_of(hook) == []


def test_every_sglang_internal_is_declared_once():
    targets = [h.target for h in HOOKS]
    assert len(targets) == len(set(targets))
    assert all(t.startswith("sglang.srt.") for t in targets)


@pytest.mark.parametrize(
    "hook", [h for h in HOOKS if h.kind in PATCHES], ids=lambda h: h.target.rsplit(".", 2)[-2]
)
def test_hook_function_takes_the_declared_parameters(hook: Hook):
    """The declared parameters are what the hook is called with (after `original` or
    `result`), so the table cannot claim more or fewer than the hook accepts."""
    leading = () if hook.kind is Kind.BEFORE else ("original_or_result",)
    inspect.signature(hook.fn).bind(*leading, *hook.params)


class _Cache:
    def free_kv_row(self, kv, spans):  # a renamed parameter
        return None

    def free_more(self, kv, ranges, extra):  # a parameter the fixed-arity hook cannot take
        return None

    def free_kw(self, kv, ranges, *, checkpoint=None):  # keyword-only, hook has no **kw
        return None

    async def stream(self, adapted_request):  # a coroutine now, no longer a generator
        return None


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType(FAKE)
    module.Cache = _Cache
    module.flag = "not a bool"
    monkeypatch.setitem(sys.modules, FAKE, module)
    return module


def _hook(target: str, **kw) -> Hook:
    base = dict(
        kind=Kind.AROUND, why="test", params=("self", "kv", "ranges"), fn=around_free_kv_row
    )
    return Hook(f"{FAKE}.{target}", **{**base, **kw})


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        (_hook("Cache.gone"), "has no attribute 'gone'"),
        (_hook("Cache.free_kv_row"), "expected parameters starting (self, kv, ranges)"),
        (_hook("Cache.free_more"), "more positional parameters than around_free_kv_row"),
        (_hook("Cache.free_kw"), "keyword-only parameters ['checkpoint']"),
        (
            _hook("Cache.stream", params=("self", "adapted_request"), async_gen=True, fn=None),
            "no longer an async generator",
        ),
        (
            _hook("Cache.free_more", kind=Kind.OVERRIDE, fn=None, exact=True),
            "expected exactly (self, kv, ranges), found (self, kv, ranges, extra)",
        ),
        (_hook("flag", kind=Kind.ATTRIBUTE, params=(), attr_type=bool), "expected a bool"),
        (_hook("Cache", kind=Kind.CALL, params=()), "expected a function, found type"),
    ],
    ids=[
        "missing",
        "renamed",
        "added",
        "keyword-only",
        "not-async-gen",
        "override-arity",
        "attr-type",
        "class",
    ],
)
def test_a_changed_target_is_reported(fake_module, hook: Hook, expected: str):
    problems = problems_of(hook)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_missing_module_is_reported():
    [problem] = problems_of(Hook("raas_no_such_module.f", Kind.CALL, "test"))
    assert problem.startswith("missing: cannot import raas_no_such_module")


def test_a_renamed_server_setting_is_reported():
    [problem] = problems_of(
        Hook("sglang.srt.server_args.ServerArgs.raas_no_such_setting", Kind.ATTRIBUTE, "t")
    )
    assert "has no attribute 'raas_no_such_setting'" in problem


def test_check_lists_every_mismatch_and_both_versions(fake_module, monkeypatch):
    monkeypatch.setattr(hook_table, "installed_sglang_version", lambda: "9.9.9")
    with pytest.raises(HookTableError) as exc:
        check_hooks([_hook("Cache.gone"), *HOOKS[:3], _hook("Cache.free_more")])
    message = str(exc.value)
    assert "SGLang 9.9.9" in message and f"SGLang {TARGET_SGLANG_VERSION}" in message
    assert f"{FAKE}.Cache.gone" in message and f"{FAKE}.Cache.free_more" in message
    assert "2 hook(s)" in message and HOOKS[0].target not in message


@pytest.fixture
def sglang_registration(monkeypatch):
    """register()'s calls into SGLang, recorded instead of made."""
    import sglang.srt.arg_groups.choices as choices
    import sglang.srt.layers.attention.attention_registry as registry
    from sglang.srt.plugins.hook_registry import HookRegistry

    from raas_backend.sglang_plugin import cpu_support

    calls: dict[str, list] = {"hooks": [], "backends": [], "choices": [], "cpu": []}
    monkeypatch.setattr(
        HookRegistry, "register", lambda target, fn, kind: calls["hooks"].append((target, fn))
    )
    monkeypatch.setattr(
        registry, "register_attention_backend", lambda name: calls["backends"].append
    )
    monkeypatch.setattr(
        choices, "add_attention_backend_choices", lambda iterable: calls["choices"].append(iterable)
    )
    monkeypatch.setattr(cpu_support, "enable_cpu_execution", lambda: calls["cpu"].append(1))
    return calls


def test_register_installs_exactly_the_table(sglang_registration, monkeypatch):
    from raas_backend.sglang_plugin import register

    monkeypatch.delenv("RAAS_BUDGET_AWARE_ADMISSION", raising=False)
    register()
    expected = [(h.target, h.fn) for h in HOOKS if h.kind in PATCHES]
    assert sglang_registration["hooks"] == expected
    assert sglang_registration["choices"] == [["raas"]]
    assert len(sglang_registration["backends"]) == 1


def test_register_skips_the_admission_hooks_when_disabled(sglang_registration, monkeypatch):
    from raas_backend.sglang_plugin import register

    monkeypatch.setenv("RAAS_BUDGET_AWARE_ADMISSION", "0")
    register()
    targets = [t for t, _ in sglang_registration["hooks"]]
    assert targets and not any("PrefillAdder" in t for t in targets)


def test_register_fails_on_a_changed_target_and_installs_nothing(
    fake_module, sglang_registration, monkeypatch
):
    from raas_backend.sglang_plugin import register

    monkeypatch.setattr(hook_table, "HOOKS", (*HOOKS, _hook("Cache.free_kv_row")))
    monkeypatch.setattr(hook_table, "installed_sglang_version", lambda: "0.5.99")
    with pytest.raises(HookTableError) as exc:
        register()
    message = str(exc.value)
    assert f"{FAKE}.Cache.free_kv_row" in message and "(self, kv, spans)" in message
    assert "SGLang 0.5.99" in message and "SGLang 0.5.23" in message
    assert sglang_registration["backends"] == sglang_registration["cpu"] == []
    # Only the launcher's refusal: a launch that asks for raas fails with this error.
    [(target, refuse)] = sglang_registration["hooks"]
    assert target == hook_table.CHECK_SERVER_ARGS and sglang_registration["choices"] == [["raas"]]
    with pytest.raises(HookTableError) as again:
        refuse(None, types.SimpleNamespace(attention_backend="raas"))
    assert again.value is exc.value
    assert refuse(None, types.SimpleNamespace(attention_backend="flashinfer")) is None
