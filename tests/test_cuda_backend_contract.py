"""The CUDA `raas` backend's step protocol, run on the CPU with fakes where CUDA is needed.

No GPU in CI: SGLang's FlashInfer backend class imports on the CPU, so the real
`RaasFlashInferBackend` methods run here, with a fake FlashInfer wrapper (records what it
is planned with), a fake page-mass kernel (the Triton kernel runs on CUDA only; it is
tested under the interpreter elsewhere) and the engine's device tensors on the `meta`
device, which holds no data: any read back to the host (`item`, `tolist`, `bool`, a
data-dependent shape) raises there. So these tests check that

- planning a step (outside the graph) reads only host data: the scheduler's batch and
  the host sequence lengths, and plans FlashInfer with host offsets;
- the decode forward (what a CUDA graph captures) reads nothing back;
- a graph's static buffers keep their addresses from capture to replay;
- a decode forward the scheduler did not announce (SGLang's warm-up) plans untracked
  rows, and each announced batch is planned once.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raas_backend.kernels.cuda import page_mass
from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV
from raas_backend.sglang_plugin.flashinfer_backend import RaasFlashInferBackend
from raas_backend.sglang_plugin.runtime import RaasRuntime
from raas_backend.sglang_plugin.step_scores import StepScores

META = torch.device("meta")
HQ, HKV, DIM, LAYERS, ROWS, CONTEXT = 4, 2, 16, 3, 8, 256


class FakeWrapper:
    """FlashInfer's decode wrapper as SGLang's graph runner holds it."""

    def __init__(self) -> None:
        self._paged_kv_indices_buf = torch.empty(ROWS * CONTEXT, dtype=torch.int32, device=META)
        self._paged_kv_indptr_buf = torch.empty(ROWS + 1, dtype=torch.int32, device=META)
        self.plans: list[dict] = []

    def begin_forward(self, indptr, indices, last_page_len, hq, hkv, dim, page, **kw):
        # Host offsets and lengths: FlashInfer's plan reads them on the host, and a
        # device tensor there would synchronise.
        assert indptr.device.type == "cpu" and last_page_len.device.type == "cpu"
        assert indices.device == META and page == 1
        self.plans.append({"indptr": indptr.tolist(), "n": indices.numel(), "hq": hq})

    def forward_return_lse(self, q, kv_cache, **kw):
        return torch.empty_like(q), torch.empty(q.shape[0], HQ, device=META)

    def forward(self, q, kv_cache, **kw):
        return torch.empty_like(q)


def make_backend(monkeypatch) -> RaasFlashInferBackend:
    be = RaasFlashInferBackend.__new__(RaasFlashInferBackend)
    be.runtime = RaasRuntime(defaults=KVPolicyConfig())
    be.raas_page_size = 16
    be.pages_cap = 8192 // 16 + 2
    be.max_rows = ROWS
    be.num_qo_heads, be.num_kv_heads, be.head_dim = HQ, HKV, DIM
    be.kv_data_type = be.q_data_type = torch.bfloat16
    be.tp_size, be.all_reduce = 1, None
    be.scores = StepScores(ROWS * be.pages_cap, HQ, META)
    be.scored_start = torch.zeros(ROWS + 1, dtype=torch.int32, device=META)
    be.page_indptr = torch.zeros(ROWS + 2, dtype=torch.int32, device=META)
    be.last_page_len_host = torch.ones(ROWS + 1, dtype=torch.int32)
    be.scoring, be.decode_bs = False, 0
    be.decode_wrappers = [FakeWrapper()]
    be.decode_cuda_graph_metadata = {}
    be.req_to_token_pool = SimpleNamespace(
        req_to_token=torch.empty(ROWS, CONTEXT, dtype=torch.int32, device=META)
    )
    k = torch.empty(ROWS * CONTEXT, HKV, DIM, device=META)
    be.token_to_kv_pool = SimpleNamespace(
        layer_num=LAYERS, get_kv_buffer=lambda layer_id: (k, k), set_kv_buffer=lambda *a: None
    )

    def prepare(bs, num_tokens, mode, spec_info):
        be.decode_cuda_graph_metadata[bs] = [FakeWrapper()]

    monkeypatch.setattr(be, "_prepare_cuda_graph_metadata", prepare, raising=False)
    monkeypatch.setattr(be, "_kv_write_scales", lambda layer: (), raising=False)
    return be


@pytest.fixture
def fake_page_mass(monkeypatch):
    calls: list[dict] = []

    def fake(q, k_buffer, kv_indptr, kv_indices, lse, layout, sm_scale, *, out, **kw):
        assert out.shape == (layout.num_pages, HQ)
        calls.append({"bs": q.shape[0], "pages": layout.num_pages})
        return out

    monkeypatch.setattr(page_mass, "page_mass_from_lse", fake)
    return calls


def decode_batch(bs: int, lens: list[int], padding: int = 0):
    return SimpleNamespace(
        batch_size=bs,
        forward_mode=SimpleNamespace(is_decode=lambda: True),
        seq_lens_cpu=torch.tensor(lens + [1] * padding, dtype=torch.int64),
        num_padding=padding,
        positions=torch.empty(bs, device=META),
        spec_info=None,
        out_cache_loc=torch.empty(bs, dtype=torch.int64, device=META),
    )


def announce(be: RaasFlashInferBackend, rows: list[int], prompt: int, steps: int, budget=32):
    states = []
    for row in rows:
        cfg = KVPolicyConfig(name="raas", budget_tokens=budget)
        state = RequestKV(cfg, prompt_len=prompt)
        for _ in range(steps):
            state.begin_step()
        be.runtime.requests[row] = SimpleNamespace(rid=f"r{row}", kv=state)
        states.append(state)
    be.runtime.set_step_batch(rows, states)
    return states


def layer(layer_id: int = 0):
    return SimpleNamespace(
        is_cross_attention=False,
        logit_cap=0.0,
        tp_q_head_num=HQ,
        head_dim=DIM,
        layer_id=layer_id,
        scaling=DIM**-0.5,
        k_scale_float=None,
        v_scale_float=None,
    )


def test_replay_plans_from_host_data_and_decodes_without_reading_back(
    monkeypatch, fake_page_mass
) -> None:
    be = make_backend(monkeypatch)
    bs = 4
    # Capture: dummy rows, the graph's static buffers allocated.
    be.init_forward_metadata_out_graph(decode_batch(bs, [1] * bs), in_capture=True)
    wrapper = be.decode_cuda_graph_metadata[bs][0]
    static = (
        wrapper._paged_kv_indices_buf.data_ptr(),
        be.scored_start.data_ptr(),
        be.scores.acc.data_ptr(),
    )
    # Replay: three real requests, one padding row.
    states = announce(be, [2, 5, 6], prompt=10, steps=70)
    lens = [s.table.seq_len for s in states]
    fb = decode_batch(bs, lens, padding=1)
    be.init_forward_metadata_out_graph(fb)
    plan = wrapper.plans[-1]
    want = [0]
    for state in states:
        want.append(want[-1] + state.positions()[0].numel())
    want.append(want[-1] + 1)  # the padding row attends one dummy position
    assert plan["indptr"] == want and plan["n"] == want[-1]
    assert be.runtime.pending_scores is not None
    assert be.runtime.pending_scores.page_indptr[-1] == sum(len(s.pages) for s in states)
    # The captured part: in-graph prep and every layer's decode on meta tensors.
    be.init_forward_metadata_in_graph(fb)
    q = torch.empty(bs, HQ * DIM, device=META)
    for i in range(LAYERS):
        # The KV write is stock SGLang (KVWriteLoc); the attention after it is ours.
        out = be.forward_decode(q, q, q, layer(i), fb, save_kv_cache=False)
        assert out.shape == (bs, HQ * DIM)
    assert fake_page_mass == [{"bs": bs, "pages": bs * be.pages_cap}] * LAYERS
    assert static == (
        wrapper._paged_kv_indices_buf.data_ptr(),
        be.scored_start.data_ptr(),
        be.scores.acc.data_ptr(),
    )


def test_an_unannounced_decode_plans_untracked_rows_once(monkeypatch, fake_page_mass) -> None:
    be = make_backend(monkeypatch)
    # SGLang's warm-up: no scheduler step announced this batch.
    be.init_forward_metadata(decode_batch(2, [5, 7]))
    assert be.decode_wrappers[0].plans[-1]["indptr"] == [0, 5, 12]
    assert be.runtime.pending_scores is None and not be.scoring
    # An announced batch is planned once; a second forward without a new announcement
    # is treated as unannounced, not as the same batch again.
    states = announce(be, [1, 3], prompt=4, steps=40)
    be.init_forward_metadata(decode_batch(2, [s.table.seq_len for s in states]))
    assert be.scoring and be.runtime.take_step_batch() is None


def test_a_batch_that_disagrees_with_the_scheduler_stops(monkeypatch, fake_page_mass) -> None:
    be = make_backend(monkeypatch)
    states = announce(be, [1, 3], prompt=4, steps=40)
    with pytest.raises(RuntimeError, match="listed 2 decode requests"):
        be.init_forward_metadata(decode_batch(3, [s.table.seq_len for s in states] + [9]))


def test_budgets_past_the_kernels_capacity_are_refused_where_they_are_read(monkeypatch) -> None:
    """RAAS_MAX_BUDGET_TOKENS sizes the graph's page grids: a request over it is a 400
    (PolicyConfigError), and so is a server default over it, even for requests that send
    no kv_policy and take the defaults whole; dense keeps no budget to bound."""
    from raas_backend.policies import PolicyConfigError
    from raas_backend.sglang_plugin.runtime import defaults_from_env, parse_custom_params

    monkeypatch.setenv("RAAS_MAX_BUDGET_TOKENS", "4096")
    with pytest.raises(PolicyConfigError, match="at most 4096"):
        parse_custom_params({"kv_policy": {"budget_tokens": 4112}}, defaults_from_env())
    assert parse_custom_params({"kv_policy": {"name": "dense"}}, defaults_from_env())
    monkeypatch.setenv("RAAS_DEFAULT_BUDGET_TOKENS", "4112")
    with pytest.raises(PolicyConfigError, match="RAAS_DEFAULT_BUDGET_TOKENS"):
        defaults_from_env()


def test_device_state_steps_plan_and_fold_without_reading_back(monkeypatch, fake_page_mass) -> None:
    """The default mode: the batched device state, driven by the scheduler hook's
    bookkeeping, sizes the lists from host counts and folds the scores on the device.
    Every tensor is on the meta device, so any read back of the state would raise."""
    from raas_backend.kernels.row_policy_state import RowPolicyState
    from raas_backend.retention import attended_tokens

    be = make_backend(monkeypatch)
    be.runtime.device_state = RowPolicyState(ROWS, be.pages_cap, 16, META)
    rtt = be.req_to_token_pool.req_to_token
    bs = 3
    be.init_forward_metadata_out_graph(decode_batch(bs, [1] * bs), in_capture=True)
    wrapper = be.decode_cuda_graph_metadata[bs][0]
    policies = [
        {"kv_policy": {"name": "raas", "budget_tokens": 32}},
        {"kv_policy": {"name": "h2o", "budget_tokens": 48, "recent_tokens": 16}},
        {"kv_policy": {"name": "dense"}},
    ]
    rows, prompt = [2, 5, 6], 10
    for step in range(70):
        entries = [
            (row, f"r{row}", params, prompt + step)
            for row, params in zip(rows, policies, strict=True)
        ]
        decoded = be.runtime.begin_decode_step(entries, rtt)
        assert decoded.host_positions == []
        plans = decoded.states
        be.init_forward_metadata_out_graph(decode_batch(bs, [p.seq_len for p in plans]))
        q = torch.empty(bs, HQ * DIM, device=META)
        be.init_forward_metadata_in_graph(decode_batch(bs, [p.seq_len for p in plans]))
        for i in range(LAYERS):
            be.forward_decode(q, q, q, layer(i), decode_batch(bs, [1] * bs), save_kv_cache=False)
    want = [0]
    for plan, budget, dense in zip(plans, [32, 48, 0], [False, False, True], strict=True):
        want.append(
            want[-1] + attended_tokens(prompt, plan.decode_len, budget, 16, frees_memory=not dense)
        )
    assert wrapper.plans[-1]["indptr"] == want
    pending = be.runtime.pending_scores
    assert pending is not None and pending.rows == rows
    # raas and h2o are scored (their held pages), dense is not.
    assert pending.page_indptr == [
        0,
        plans[0].held_pages,
        plans[0].held_pages + plans[1].held_pages,
        plans[0].held_pages + plans[1].held_pages,
    ]
    assert plans[0].evicted_pages > 0 and plans[1].evicted_pages > 0
