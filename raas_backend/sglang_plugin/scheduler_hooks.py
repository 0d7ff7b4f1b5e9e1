"""Hooks into SGLang's scheduler: evict before each decode allocation, never free twice.

- Before `ScheduleBatch.maybe_evict_swa` (the top of every decode allocation, the same
  point SGLang uses for sliding-window eviction): each request folds the last step's
  scores, accounts its new token, and evicts pages over budget
  (`RaasRuntime.begin_decode_step`: on the device for the batched state, per request
  on the host otherwise). Their slots go back to the allocator at once and their
  `req_to_token` entries are set to the padding slot 0, so SGLang's page-invariant
  checker never sees a freed slot owned by a live request.
- Around `BasePrefixCache.free_kv_row`: the finish-time free skips evicted positions
  (slot 0), so no slot is freed twice.
- Around `release_kv_cache`: the request's state is dropped (finish, abort), or kept
  aside on retraction: SGLang re-prefills the whole history, and at the next decode
  step the generated part counts as decode pages again, evicted down to the budget.
- Around `kv_private_tokens`: SGLang's busy-time leak check counts what a request
  really holds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raas_backend.sglang_plugin.runtime import current_runtime

logger = logging.getLogger(__name__)

PADDING_SLOT = 0


def before_decode_alloc(batch: Any, *args: Any, **kwargs: Any) -> None:
    runtime = current_runtime()
    if runtime is None or not batch.forward_mode.is_decode():
        return None
    rtt = batch.req_to_token_pool.req_to_token
    allocator = batch.token_to_kv_pool_allocator
    entries = [
        (req.kv.req_pool_idx, req.rid, req.sampling_params.custom_params, kv_len)
        for req, kv_len in zip(batch.reqs, batch.seq_lens_cpu.tolist(), strict=True)
    ]
    step = runtime.begin_decode_step(entries, rtt)
    if step.device_slots is not None and step.device_slots.numel():
        # Already replaced by the padding slot in req_to_token, and checked there
        # (`RowPolicyState.check`); the length is the host's count, nothing was read.
        allocator.free(step.device_slots)
        runtime.evicted_slots_total += step.device_slots.numel()
    if step.host_positions:
        row_t = torch.tensor(step.host_rows, dtype=torch.int64, device=rtt.device)
        pos_t = torch.tensor(step.host_positions, dtype=torch.int64, device=rtt.device)
        slots = rtt[row_t, pos_t].to(torch.int64)
        # One check for the whole step (one host read on a GPU, not one per request).
        if bool((slots == PADDING_SLOT).any()):
            bad = sorted({r for r, s in zip(step.host_rows, slots.tolist(), strict=True) if s == 0})
            raise RuntimeError(f"raas: rows {bad} evict a position already freed")
        rtt[row_t, pos_t] = PADDING_SLOT
        allocator.free(slots)
        runtime.evicted_slots_total += slots.numel()
    return None


def _split_ranges(row: torch.Tensor, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sub-ranges of `ranges` whose entries are live slots (not the padding slot)."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if end <= start:
            continue
        live = (row[start:end] != PADDING_SLOT).tolist()
        run_start = None
        for i, ok in enumerate(live):
            if ok and run_start is None:
                run_start = i
            elif not ok and run_start is not None:
                out.append((start + run_start, start + i))
                run_start = None
        if run_start is not None:
            out.append((start + run_start, end))
    return out


def around_free_kv_row(original, cache: Any, kv: Any, ranges: list[tuple[int, int]]) -> None:
    runtime = current_runtime()
    row_idx = getattr(kv, "req_pool_idx", None)
    if runtime is None or row_idx is None or runtime.evicted_positions(row_idx) == 0:
        return original(cache, kv, ranges)
    row = cache.req_to_token_pool.req_to_token[row_idx]
    return original(cache, kv, _split_ranges(row, ranges))


def around_release_kv_cache(original, req: Any, *args: Any, **kwargs: Any) -> Any:
    # The row index may be cleared by the release itself: read it first, drop after,
    # so the finish-time free still sees which positions were evicted.
    row = getattr(req.kv, "req_pool_idx", None)
    result = original(req, *args, **kwargs)
    runtime = current_runtime()
    if runtime is not None and row is not None:
        # Retraction releases a request that has not finished; finish and abort do not.
        runtime.release(row, req.rid, retracted=not req.finished())
    return result


def around_kv_private_tokens(original, kv: Any, page_size: int) -> int:
    held = original(kv, page_size)
    runtime = current_runtime()
    if runtime is None or getattr(kv, "req_pool_idx", None) is None:
        return held
    return held - runtime.evicted_positions(kv.req_pool_idx)
