"""The runtime's two modes free the same slots through a request's whole life.

`RaasRuntime.begin_decode_step` is what the scheduler hook runs before each decode
allocation. Driven here as the scheduler drives it (rows, kv lengths, finishes,
a retraction and its re-prefill into another row, quest beside the others), with a
fake `req_to_token` table: the host mode (one `RequestKV` per request) and the device
mode (`RowPolicyState` + `RowPlan`) free the same slots at every step, report the same
statistics, and never free a slot twice. No engine: the engine tests run the device
mode end to end.
"""

from __future__ import annotations

import pytest
import torch

from raas_backend.kernels.row_policy_state import RowPolicyState
from raas_backend.policies import KVPolicyConfig
from raas_backend.row_plan import RowPlan
from raas_backend.sglang_plugin.runtime import RaasRuntime, pages_cap, policy_state_mode


def test_the_mode_defaults_to_the_device_state_and_is_settable():
    assert policy_state_mode({}) == "device"
    assert policy_state_mode({"RAAS_POLICY_STATE": "host"}) == "host"
    with pytest.raises(ValueError, match="RAAS_POLICY_STATE"):
        policy_state_mode({"RAAS_POLICY_STATE": "gpu"})


CONTEXT = 512
POLICIES = {
    "a": {"kv_policy": {"name": "raas", "budget_tokens": 48}},
    "b": {"kv_policy": {"name": "streaming", "budget_tokens": 32}},
    "c": {"kv_policy": {"name": "h2o", "budget_tokens": 64, "recent_tokens": 16}},
    "d": {"kv_policy": {"name": "dense"}},
    "e": {"kv_policy": {"name": "quest", "budget_tokens": 32}},
}


class FakeEngine:
    """Rows of slots; a slot is never handed out twice, freed slots are recorded."""

    def __init__(self, device_mode: bool) -> None:
        self.rtt = torch.zeros(8, CONTEXT, dtype=torch.int32)
        self.next_slot = 1
        self.freed: list[int] = []
        self.rt = RaasRuntime(defaults=KVPolicyConfig())
        if device_mode:
            self.rt.device_state = RowPolicyState(8, pages_cap(16), 16, "cpu")

    def fill(self, row: int, start: int, end: int) -> None:
        n = end - start
        self.rtt[row, start:end] = torch.arange(self.next_slot, self.next_slot + n)
        self.next_slot += n

    def step(self, batch: dict[str, tuple[int, int]]) -> list[int]:
        """One decode step of `batch` (rid -> (row, kv length)); returns freed slots."""
        entries = [(row, rid, POLICIES[rid], kv_len) for rid, (row, kv_len) in batch.items()]
        step = self.rt.begin_decode_step(entries, self.rtt)
        freed: list[int] = []
        if step.device_slots is not None:
            freed += step.device_slots.tolist()
        for row, pos in zip(step.host_rows, step.host_positions, strict=True):
            slot = int(self.rtt[row, pos])
            assert slot != 0, "host path frees a padding slot"
            self.rtt[row, pos] = 0
            freed.append(slot)
        assert 0 not in freed
        for row, kv_len in batch.values():
            self.fill(row, kv_len, kv_len + 1)  # the new token's slot
        self.freed += freed
        return sorted(freed)


def test_host_and_device_modes_free_the_same_slots():
    host, device = FakeEngine(False), FakeEngine(True)
    prompts = {"a": 20, "b": 7, "c": 33, "d": 12, "e": 9}
    rows = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    lengths = dict(prompts)
    for engine in (host, device):
        for rid, row in rows.items():
            engine.fill(row, 0, prompts[rid])
    for step in range(150):
        if step == 90:
            # "a" is retracted and later re-prefilled into row 6 with its history.
            for engine in (host, device):
                engine.rt.release(rows["a"], "a", retracted=True)
                engine.rtt[rows["a"]].zero_()
            del rows["a"]
        if step == 95:
            rows["a"] = 6
            for engine in (host, device):
                engine.fill(6, 0, lengths["a"])
        if step == 120:
            for engine in (host, device):
                engine.rt.release(rows["b"], "b")
            del rows["b"]
        batch = {rid: (row, lengths[rid]) for rid, row in rows.items()}
        freed = host.step(batch)
        assert freed == device.step(batch), f"step {step}"
        if step == 95:
            # The re-prefilled history goes back down to the budget at once.
            assert len(freed) > 16
        for rid in batch:
            lengths[rid] += 1
            h, d = host.rt.get(rows[rid]), device.rt.get(rows[rid])
            assert h.stats() == d.stats(), (step, rid)
            assert isinstance(d, RowPlan) == (rid != "e")
    assert host.freed and len(set(host.freed)) == len(host.freed)
    assert sorted(host.freed) == sorted(device.freed)
    # The resumed request is bounded again on both.
    assert device.rt.get(6).retained_decode_tokens <= 48
