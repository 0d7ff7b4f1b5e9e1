"""RaaS bookkeeping for a whole batch at once, on the device that holds the state.

The per-request policy (`raas_backend.policies.raas.RaaSPolicy`) is the specification;
this module does the same steps for B requests with tensor operations only (no Python
loop over requests), so the GPU decode step needs no per-request host work. It runs on
the CPU too, which is how the tests check it against the per-request policy.

State (`BatchedRaaSState`), one row per request in the batch:

- ``pages``: shape [B, cap], dtype torch.int32. Retained decode pages (logical ids,
  ascending, the tail last), padded with -1: the ``pages`` table of
  `raas_backend.kernels.cuda.indexing.build_sparse_indices`.
- ``last_used``: shape [B, cap], dtype torch.int32. The step at which each listed page
  was last used (its creation step until then).
- ``num_pages``, ``prompt_lens``, ``seq_lens``, ``budget_tokens``: shape [B], dtype
  torch.int32.

One decode step, in the order `RequestKV.begin_step` uses:
`record_scores` (the previous step's page scores), `open_pages` (account the new token),
`select_victims` + `evict` (fit the budget); `victim_slots` lists the slots to free.
`decode_step` does the four in order: with torch operations on the CPU, with one Triton
kernel (`raas_backend.kernels.cuda.bookkeeping`) on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class BatchedRaaSState:
    """RaaS page state of B requests; see the module docstring for shapes and dtypes."""

    pages: torch.Tensor
    last_used: torch.Tensor
    num_pages: torch.Tensor
    prompt_lens: torch.Tensor
    seq_lens: torch.Tensor
    budget_tokens: torch.Tensor
    page_size: int

    def __post_init__(self) -> None:
        _expect(self.page_size >= 1, f"expected page_size >= 1, got {self.page_size}")
        _expect(
            self.pages.dim() == 2,
            f"expected pages of shape [B, cap], got {tuple(self.pages.shape)}",
        )
        _expect(
            self.last_used.shape == self.pages.shape,
            f"expected last_used of shape {tuple(self.pages.shape)}, "
            f"got {tuple(self.last_used.shape)}",
        )
        batch = self.pages.shape[0]
        for name in ("num_pages", "prompt_lens", "seq_lens", "budget_tokens"):
            t = getattr(self, name)
            _expect(
                t.shape == (batch,), f"expected {name} of shape [{batch}], got {tuple(t.shape)}"
            )

    @classmethod
    def empty(
        cls,
        prompt_lens: torch.Tensor,
        budget_tokens: torch.Tensor,
        capacity: int,
        page_size: int,
    ) -> BatchedRaaSState:
        """Requests right after prefill: no decode pages yet.

        prompt_lens, budget_tokens: shape [B], integer; capacity: pages per row (at least
        budget_tokens // page_size + 2, so a row never overflows between evictions).
        """
        batch = prompt_lens.numel()
        device = prompt_lens.device
        return cls(
            pages=torch.full((batch, capacity), -1, dtype=torch.int32, device=device),
            last_used=torch.zeros((batch, capacity), dtype=torch.int32, device=device),
            num_pages=torch.zeros(batch, dtype=torch.int32, device=device),
            prompt_lens=prompt_lens.to(torch.int32).clone(),
            seq_lens=prompt_lens.to(torch.int32).clone(),
            budget_tokens=budget_tokens.to(torch.int32).clone(),
            page_size=page_size,
        )

    @property
    def batch(self) -> int:
        return self.pages.shape[0]

    @property
    def capacity(self) -> int:
        return self.pages.shape[1]

    def listed(self) -> torch.Tensor:
        """Which entries of ``pages`` are real. shape: [B, cap], dtype: torch.bool"""
        col = torch.arange(self.capacity, device=self.pages.device)
        return col[None, :] < self.num_pages[:, None]

    def page_indptr(self) -> torch.Tensor:
        """Global page id offsets of the listed pages. shape: [B + 1], dtype: torch.int64"""
        out = torch.zeros(self.batch + 1, dtype=torch.int64, device=self.pages.device)
        torch.cumsum(self.num_pages.long(), dim=0, out=out[1:])
        return out


def record_scores(
    state: BatchedRaaSState,
    scores: torch.Tensor,
    step: int,
    alpha: float | torch.Tensor,
    refresh_top_fraction: float = 0.0,
) -> None:
    """Mark pages used at `step`: last_used = step where the page's score exceeds alpha.

    scores: shape [sum(num_pages)], dtype float32, the aggregated mass of every listed
        page in global page order (request by request, as the CSR layout numbers them);
        it must describe the pages listed now (call before `open_pages`/`evict`).
    alpha: a float, or shape [B] float32 (per-request thresholds).
    refresh_top_fraction: the adaptive variant; the top ceil(f * n) pages of each request
        by score are marked used as well.
    """
    listed = state.listed()
    _expect(scores.dim() == 1, f"expected 1-D scores, got shape {tuple(scores.shape)}")
    _expect(
        0.0 <= refresh_top_fraction <= 1.0,
        f"expected refresh_top_fraction in [0, 1], got {refresh_top_fraction}",
    )
    if scores.device.type == "cpu":  # the check costs a sync elsewhere
        total = int(state.num_pages.sum())
        _expect(scores.numel() == total, f"expected {total} page scores, got {scores.numel()}")
    counts = state.num_pages.long()
    rows = torch.repeat_interleave(
        torch.arange(state.batch, device=counts.device), counts, output_size=scores.numel()
    )
    cols = torch.arange(scores.numel(), device=counts.device) - state.page_indptr()[rows]
    dense = torch.full(listed.shape, float("-inf"), dtype=torch.float32, device=scores.device)
    dense[rows, cols] = scores.float()
    # A Python float compares without a host-to-device copy (which would sync).
    thr = alpha.float().view(-1, 1) if isinstance(alpha, torch.Tensor) else float(alpha)
    used = listed & (dense > thr)
    if refresh_top_fraction > 0.0:
        # Same count as RaaSPolicy: ceil with a tolerance, in float64, so 0.07*100 is 7.
        k = torch.ceil(state.num_pages.double() * refresh_top_fraction - 1e-9).long()
        k = torch.clamp(k, min=1)
        order = torch.argsort(dense, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(state.capacity, device=order.device).expand_as(order))
        # A page no head attended at all was not used, whatever its rank among ties.
        used |= listed & (rank < k[:, None]) & (dense > 0)
    state.last_used = torch.where(used, torch.full_like(state.last_used, step), state.last_used)


def open_pages(state: BatchedRaaSState, step: int) -> torch.Tensor:
    """Account one new decode token per request; open a page where one starts.

    Returns shape [B], dtype torch.bool: which requests opened a page (its last_used is
    `step`). Rows must have room (num_pages < cap) where a page opens.
    """
    decode_len = (state.seq_lens - state.prompt_lens).long()
    opens = decode_len % state.page_size == 0
    new_id = torch.div(decode_len, state.page_size, rounding_mode="floor").to(torch.int32)
    col = torch.arange(state.capacity, device=state.pages.device)
    at = opens[:, None] & (col[None, :] == state.num_pages[:, None])
    state.pages = torch.where(at, new_id[:, None], state.pages)
    state.last_used = torch.where(at, torch.full_like(state.last_used, step), state.last_used)
    state.num_pages = state.num_pages + opens.to(torch.int32)
    state.seq_lens = state.seq_lens + 1
    return opens


def select_victims(state: BatchedRaaSState) -> torch.Tensor:
    """Pages to evict so retained decode tokens fit each request's budget.

    Oldest ``last_used`` first, ties broken by the older page; never the tail page.
    Returns shape [B, cap], dtype torch.bool (True: evict that entry of ``pages``).
    """
    p = state.page_size
    listed = state.listed()
    decode_len = (state.seq_lens - state.prompt_lens).long()
    tok = (decode_len[:, None] - state.pages.long() * p).clamp(0, p)
    tok = torch.where(listed, tok, torch.zeros_like(tok))
    excess = (tok.sum(dim=1) - state.budget_tokens.long()).clamp(min=0)
    n_evict = torch.div(excess + p - 1, p, rounding_mode="floor")
    tail_id = torch.div(decode_len - 1, p, rounding_mode="floor")
    candidate = listed & (state.pages.long() != tail_id[:, None])
    big = torch.iinfo(torch.int64).max
    key = (state.last_used.long() << 32) | state.pages.long()
    key = torch.where(candidate, key, torch.full_like(key, big))
    order = torch.argsort(key, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(state.capacity, device=order.device).expand_as(order))
    return candidate & (rank < n_evict[:, None])


def victim_slots(
    evicted: torch.Tensor,
    prompt_lens: torch.Tensor,
    page_size: int,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
) -> torch.Tensor:
    """Slots held by the evicted pages (all full pages: the tail is never a victim).

    evicted: shape [B, cap], dtype torch.int32, victim page ids (-1 elsewhere), as
        `decode_step` returns them. prompt_lens: shape [B], integer.
    req_to_token: shape [rows, max_context], integer; req_rows: shape [B], integer.
    Returns shape [num_victims * page_size], dtype of req_to_token (one host sync).
    """
    b, i = (evicted >= 0).nonzero(as_tuple=True)
    start = prompt_lens.long()[b] + evicted.long()[b, i] * page_size
    pos = start[:, None] + torch.arange(page_size, device=start.device)[None, :]
    return req_to_token[req_rows.long()[b][:, None], pos].reshape(-1)


def evict(state: BatchedRaaSState, victims: torch.Tensor) -> None:
    """Drop the victim entries, keeping the order of the rest.

    victims: shape [B, cap], dtype torch.bool.
    """
    keep = state.listed() & ~victims
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    pages = torch.gather(state.pages, 1, order)
    last = torch.gather(state.last_used, 1, order)
    n = keep.sum(dim=1).to(torch.int32)
    col = torch.arange(state.capacity, device=pages.device)
    live = col[None, :] < n[:, None]
    state.pages = torch.where(live, pages, torch.full_like(pages, -1))
    state.last_used = torch.where(live, last, torch.zeros_like(last))
    state.num_pages = n


def min_capacity(budget_tokens: int, page_size: int) -> int:
    """Pages a row needs: the budget, one partial page over it, and the new tail."""
    return math.ceil(budget_tokens / page_size) + 2


def decode_step(
    state: BatchedRaaSState,
    scores: torch.Tensor | None,
    step: int,
    alpha: float,
    refresh_top_fraction: float = 0.0,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """One step of `RequestKV.begin_step` for the batch.

    `record_scores` with the scores of step ``step - 1`` (skipped when None), then
    `open_pages` at ``step``, `select_victims` and `evict`.
    scores: shape [sum(num_pages)], dtype float32, or None at the first decode step.
    fused: run the single Triton kernel (`kernels.cuda.bookkeeping`); None: on CUDA.
    Returns evicted: shape [B, cap], dtype torch.int32, the page id of each victim at
    its position in the list before eviction, -1 elsewhere (see `victim_slots`).
    """
    if fused is None:
        fused = state.pages.is_cuda
    if fused:
        from raas_backend.kernels.cuda.bookkeeping import raas_step_fused

        _expect(
            scores is None or scores.dim() == 1,
            f"expected 1-D scores, got shape {tuple(scores.shape) if scores is not None else ()}",
        )
        _expect(
            0.0 <= refresh_top_fraction <= 1.0,
            f"expected refresh_top_fraction in [0, 1], got {refresh_top_fraction}",
        )
        pages, last = state.pages.contiguous(), state.last_used.contiguous()
        num, evicted = raas_step_fused(
            pages,
            last,
            state.num_pages,
            state.prompt_lens,
            state.seq_lens,
            state.budget_tokens,
            None if scores is None else scores.float(),
            step,
            float(alpha),
            refresh_top_fraction,
            state.page_size,
        )
        state.pages, state.last_used, state.num_pages = pages, last, num
        return evicted
    if scores is not None:
        record_scores(state, scores, step - 1, alpha, refresh_top_fraction)
    open_pages(state, step)
    victims = select_victims(state)
    evicted = torch.where(victims, state.pages, torch.full_like(state.pages, -1))
    evict(state, victims)
    return evicted
