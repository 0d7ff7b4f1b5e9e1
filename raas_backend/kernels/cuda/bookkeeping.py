"""RaaS bookkeeping for the whole batch in one Triton launch.

One program per request row does what `raas_backend.kernels.batched_policy.decode_step`
does with ~40 torch operations: record the previous step's scores (last_used = step - 1
where score > alpha; the adaptive variant also refreshes the top ceil(f * n) pages),
account the new token (open a page when one starts), pick the victims (oldest
last_used first, ties by page id, never the tail) and compact the row. The row (at most
``cap`` entries, cap ~ budget / page_size + 2) lives in registers, so the victim and
top-k selections are short loops of vector min/max reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _raas_step_kernel(
    Pages,
    LastUsed,
    NumIn,
    NumOut,
    PromptLens,
    SeqLens,
    Budget,
    Scores,
    Evicted,
    alpha,
    refresh_top_fraction,
    step,
    batch,
    cap,
    stride_row,
    P: tl.constexpr,
    CAP: tl.constexpr,
    BB: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    REFRESH: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.arange(0, BB)
    nums = tl.load(NumIn + j, mask=j < batch, other=0)
    off = tl.sum(tl.where(j < b, nums, 0))
    n = tl.load(NumIn + b)
    i = tl.arange(0, CAP)
    inrow = i < cap
    listed = i < n
    row = b.to(tl.int64) * stride_row
    pages = tl.load(Pages + row + i, mask=inrow, other=-1)
    last = tl.load(LastUsed + row + i, mask=inrow, other=0)
    if HAS_SCORES:
        sc = tl.load(Scores + off + i, mask=listed, other=float("-inf"))
        used = listed & (sc > alpha)
        if REFRESH:
            # Matches RaaSPolicy's ceil(frac * n - 1e-9); float32 needs a wider tolerance.
            k_top = tl.maximum(
                tl.ceil(n.to(tl.float32) * refresh_top_fraction - 1e-4).to(tl.int32), 1
            )
            left = tl.where(listed, sc, float("-inf"))
            picked = i < 0
            for _ in range(0, k_top):
                best = tl.max(left, axis=0)
                first = tl.min(tl.where((left == best) & ~picked & listed, i, CAP), axis=0)
                hit = i == first
                picked = picked | hit
                left = tl.where(hit, float("-inf"), left)
            used = used | (picked & listed & (sc > 0))
        last = tl.where(used, step - 1, last)
    pl = tl.load(PromptLens + b)
    sl = tl.load(SeqLens + b)
    dl = sl - pl
    opens = (dl % P) == 0
    at = opens & (i == n)
    pages = tl.where(at, dl // P, pages)
    last = tl.where(at, step, last)
    n = n + opens.to(tl.int32)
    dl = dl + 1
    tl.store(SeqLens + b, sl + 1)
    listed = i < n
    tok = tl.minimum(tl.maximum(dl - pages * P, 0), P)
    tok = tl.where(listed, tok, 0)
    excess = tl.maximum(tl.sum(tok, axis=0) - tl.load(Budget + b), 0)
    n_evict = (excess + P - 1) // P
    tail = (dl - 1) // P
    cand = listed & (pages != tail)
    big = 0x3FFFFFFFFFFFFFFF
    key = (last.to(tl.int64) << 32) | pages.to(tl.int64)
    victim = i < 0
    for _ in range(0, n_evict):
        kk = tl.where(cand & ~victim, key, big)
        low = tl.min(kk, axis=0)
        victim = victim | ((kk == low) & (low != big))
    keep = listed & ~victim
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    new_n = tl.sum(keep.to(tl.int32), axis=0)
    tl.store(Pages + row + pos, pages, mask=keep)
    tl.store(LastUsed + row + pos, last, mask=keep)
    pad = inrow & (i >= new_n)
    tl.store(Pages + row + i, tl.full([CAP], -1, tl.int32), mask=pad)
    tl.store(LastUsed + row + i, tl.zeros([CAP], tl.int32), mask=pad)
    tl.store(Evicted + row + i, tl.where(victim, pages, -1), mask=inrow)
    tl.store(NumOut + b, new_n)


def raas_step_fused(
    pages: torch.Tensor,
    last_used: torch.Tensor,
    num_pages: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    budget_tokens: torch.Tensor,
    scores: torch.Tensor | None,
    step: int,
    alpha: float,
    refresh_top_fraction: float,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bookkeeping step; pages, last_used, seq_lens are updated in place.

    pages, last_used: shape [B, cap], dtype torch.int32, contiguous rows.
    num_pages, prompt_lens, seq_lens, budget_tokens: shape [B], dtype torch.int32.
    scores: shape [sum(num_pages)], dtype torch.float32, or None (first step).
    Returns (new num_pages: shape [B] int32, evicted: shape [B, cap] int32, the page id
    of each victim at its position in the pre-step list, -1 elsewhere).
    """
    batch, cap = pages.shape
    num_out = torch.empty_like(num_pages)
    evicted = torch.empty_like(pages)
    if batch == 0:
        return num_out, evicted
    scores_arg = scores if scores is not None else last_used
    _raas_step_kernel[(batch,)](
        pages,
        last_used,
        num_pages,
        num_out,
        prompt_lens,
        seq_lens,
        budget_tokens,
        scores_arg,
        evicted,
        float(alpha),
        float(refresh_top_fraction),
        step,
        batch,
        cap,
        pages.stride(0),
        P=page_size,
        CAP=triton.next_power_of_2(max(cap, 2)),
        BB=triton.next_power_of_2(max(batch, 2)),
        HAS_SCORES=scores is not None,
        REFRESH=refresh_top_fraction > 0.0,
        num_warps=4,
    )
    return num_out, evicted
