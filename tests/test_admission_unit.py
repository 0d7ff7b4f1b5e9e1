"""Budget-aware admission arithmetic and the temporary max_new_tokens view.

The hooks run inside SGLang's scheduler (exercised by tests/test_raas_memory_engine.py);
here the request objects are minimal stand-ins carrying only the fields the view reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.sglang_plugin import admission, runtime


@dataclass
class Params:
    max_new_tokens: int | None
    custom_params: Any = None


@dataclass
class Row:
    req_pool_idx: int | None


@dataclass
class Req:
    rid: str
    sampling_params: Params
    output_ids: list[int] = field(default_factory=list)
    kv: Row | None = None


@pytest.fixture
def active_runtime(monkeypatch):
    rt = runtime.RaasRuntime(defaults=KVPolicyConfig(name="raas", budget_tokens=64))
    monkeypatch.setattr(runtime, "_RUNTIME", rt)
    return rt


def kv(policy: dict[str, Any]) -> dict[str, Any]:
    return {"kv_policy": policy}


@pytest.mark.parametrize(
    ("name", "cap"),
    [("raas", 80), ("streaming", 80), ("h2o", 80), ("dense", None), ("quest", None)],
)
def test_decode_cap_only_for_policies_that_free(name, cap):
    config = KVPolicyConfig(name=name, budget_tokens=64, recent_tokens=16)
    assert admission.decode_cap(config) == cap


def test_growth_headroom():
    assert admission.growth_headroom(1000, 0, 80) == 80
    assert admission.growth_headroom(30, 0, 80) == 30
    assert admission.growth_headroom(1000, 70, 80) == 10
    assert admission.growth_headroom(1000, 95, 80) == 0
    assert admission.growth_headroom(1000, 0, None) == 1000
    assert admission.growth_headroom(-5, 0, 80) == 0


def test_view_shrinks_freeing_requests_and_restores(active_runtime):
    raas = Req("a", Params(1000, kv({"name": "raas", "budget_tokens": 64})), output_ids=[1] * 10)
    dense = Req("b", Params(1000, kv({"name": "dense"})))
    default = Req("c", Params(500))  # server default: raas, budget 64
    short = Req("d", Params(20, kv({"name": "streaming", "budget_tokens": 64})))
    with admission.bounded_generation_view([raas, dense, default, short, raas]):
        assert raas.sampling_params.max_new_tokens == 10 + 80
        assert dense.sampling_params.max_new_tokens == 1000
        assert default.sampling_params.max_new_tokens == 80
        assert short.sampling_params.max_new_tokens == 20
    assert [r.sampling_params.max_new_tokens for r in (raas, dense, default, short)] == [
        1000,
        1000,
        500,
        20,
    ]


def test_view_restores_on_error(active_runtime):
    req = Req("a", Params(1000))
    with pytest.raises(RuntimeError), admission.bounded_generation_view([req]):
        assert req.sampling_params.max_new_tokens == 80
        raise RuntimeError("admission failed")
    assert req.sampling_params.max_new_tokens == 1000


def test_view_counts_what_a_running_request_holds(active_runtime):
    config = KVPolicyConfig(name="raas", budget_tokens=64)
    state = RequestKV(config, prompt_len=5)
    for _ in range(50):
        state.begin_step()
    active_runtime.requests[3] = runtime.Tracked("a", state)
    held = state.table.retained_decode_tokens
    req = Req("a", Params(1000), output_ids=[0] * 51, kv=Row(3))
    stranger = Req("x", Params(1000), output_ids=[0] * 51, kv=Row(3))  # row reused
    with admission.bounded_generation_view([req, stranger]):
        assert req.sampling_params.max_new_tokens == 51 + 80 - held
        assert stranger.sampling_params.max_new_tokens == 51 + 80


def test_view_is_idle_without_the_raas_backend(monkeypatch):
    monkeypatch.setattr(runtime, "_RUNTIME", None)
    req = Req("a", Params(1000))
    with admission.bounded_generation_view([req]):
        assert req.sampling_params.max_new_tokens == 1000


def test_invalid_policy_falls_back_to_defaults(active_runtime):
    req = Req("a", Params(1000, kv({"name": "raas", "budget_tokens": -1})))
    with admission.bounded_generation_view([req]):
        assert req.sampling_params.max_new_tokens == 80


@dataclass
class FakeScheduler:
    max_total_num_tokens: int
    page_size: int = 1
    max_new_tokens_limit: int | None = None
    model_config: Any = None

    def clip(self, req: Any) -> None:
        # SGLang's own clip: the whole generation must fit the pool.
        params = req.sampling_params
        params.max_new_tokens = min(
            params.max_new_tokens, self.max_total_num_tokens - len(req.origin_input_ids) - 2
        )


@dataclass
class IngressReq(Req):
    origin_input_ids: list[int] = field(default_factory=list)
    aborted: bool = False

    def finished(self) -> bool:
        return self.aborted


@dataclass
class ContextConfig:
    context_len: int


def ingress(sched: FakeScheduler, req: IngressReq) -> int | None:
    admission.around_init_req_max_new_tokens(lambda s, r: s.clip(r), sched, req)
    return req.sampling_params.max_new_tokens


def test_ingress_keeps_requested_length_for_bounded_requests(active_runtime):
    sched = FakeScheduler(max_total_num_tokens=640, model_config=ContextConfig(4096))
    prompt = list(range(40))
    raas = IngressReq("a", Params(3000), origin_input_ids=prompt)
    assert ingress(sched, raas) == 3000
    beyond_context = IngressReq("b", Params(9000), origin_input_ids=prompt)
    assert ingress(sched, beyond_context) == 4096 - 1 - 40
    dense = IngressReq("c", Params(3000, kv({"name": "dense"})), origin_input_ids=prompt)
    assert ingress(sched, dense) == 640 - 40 - 2
    sched.max_new_tokens_limit = 1000
    assert ingress(sched, IngressReq("d", Params(3000), origin_input_ids=prompt)) == 1000


def test_ingress_leaves_sglang_clip_when_bounded_kv_does_not_fit(active_runtime):
    sched = FakeScheduler(max_total_num_tokens=640, model_config=ContextConfig(4096))
    big_prompt = IngressReq("a", Params(3000), origin_input_ids=list(range(580)))
    assert ingress(sched, big_prompt) == 640 - 580 - 2
    aborted = IngressReq("b", Params(3000), origin_input_ids=[1], aborted=True)
    assert ingress(sched, aborted) == 640 - 1 - 2


def test_admission_switch():
    assert admission.admission_enabled({})
    assert not admission.admission_enabled({"RAAS_BUDGET_AWARE_ADMISSION": "0"})
    assert admission.admission_enabled({"RAAS_BUDGET_AWARE_ADMISSION": "1"})
