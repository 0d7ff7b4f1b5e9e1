"""One decode step's attention lists, built from the requests' page tables.

Every request attends its prompt, the pages its policy keeps this step and its tail
(`RequestKV.positions`). Instead of listing every position on the host, the host lists
*segments*: the prompt is one, each page another (a page's positions are consecutive),
so a step of 32 requests at budget 2K is a few thousand integers, whatever the context
length. `expand_segments` turns them into the engine's slots on the device with a fixed
number of tensor operations and no read back to the host, given the totals the host
already knows. The same code serves the CPU engine and the CUDA one, so the CPU tests in
CI exercise what the GPU path runs; only the attention kernels differ.

Scored pages (policies that need attention mass) follow the prompt in each list, in
the order of `RequestKV.pages` (ascending, the tail last), so a request's scored entries
are whole pages of `page_size` entries but the last: the layout the page-mass kernels
read (`raas_backend.kernels.cuda.indexing.PageLayout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raas_backend.request_kv import RequestKV
from raas_backend.retention import attended_tokens
from raas_backend.row_plan import RowPlan


class _StepTotals:
    """What the planner reads off a step's offsets (both layouts have them)."""

    kv_indptr: torch.Tensor
    page_indptr: torch.Tensor

    @property
    def total_tokens(self) -> int:
        return int(self.kv_indptr[-1])

    @property
    def num_pages(self) -> int:
        return int(self.page_indptr[-1])

    @property
    def max_pages_per_request(self) -> int:
        counts = self.page_indptr[1:] - self.page_indptr[:-1]
        return int(counts.max()) if counts.numel() else 0


@dataclass(frozen=True)
class StepLists(_StepTotals):
    """The segments of one decode step, all host-side.

    seg_row, seg_start, seg_len: shape [S], dtype torch.int64: segment s covers
        positions ``seg_start[s] .. seg_start[s] + seg_len[s] - 1`` of row ``seg_row[s]``.
    seg_page: shape [S], dtype torch.int64: global scored-page id of segment s, or -1.
    kv_indptr: shape [B + 1], dtype torch.int32: CSR offsets of each request's list.
    scored_start: shape [B], dtype torch.int32: entries of each list before its first
        scored page (the prompt; the whole list for requests that are not scored).
    page_indptr: shape [B + 1], dtype torch.int32: each request's scored pages.
    states: the requests' states (None: an untracked row, attended densely).
    """

    seg_row: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_page: torch.Tensor
    kv_indptr: torch.Tensor
    scored_start: torch.Tensor
    page_indptr: torch.Tensor
    states: list[RequestKV | None]


def build_step_lists(
    rows: Sequence[int],
    seq_lens: Sequence[int],
    states: Sequence[RequestKV | None],
    *,
    score: bool = True,
) -> StepLists:
    """Segments for the requests in `rows` (their `req_to_token` rows).

    seq_lens: each request's current length (the engine's, checked against the state).
    states: `RequestKV` per request, or None for a row no policy tracks (its whole
        length is attended; CUDA-graph padding rows are such).
    score: False lists no scored pages at all (a step whose scores nobody reads).
    """
    if not len(rows) == len(seq_lens) == len(states):
        raise ValueError(
            f"expected rows, seq_lens and states of one length, got "
            f"{len(rows)}, {len(seq_lens)}, {len(states)}"
        )
    seg_row: list[torch.Tensor] = []
    seg_start: list[torch.Tensor] = []
    seg_len: list[torch.Tensor] = []
    seg_page: list[torch.Tensor] = []
    indptr = [0]
    scored_start: list[int] = []
    page_indptr = [0]
    for row, seq_len, state in zip(rows, seq_lens, states, strict=True):
        if state is None:
            starts = torch.zeros(1, dtype=torch.int64)
            lens = torch.tensor([seq_len], dtype=torch.int64)
            pages = torch.full((1,), -1, dtype=torch.int64)
            listed = seq_len
            scored_start.append(listed)
            page_indptr.append(page_indptr[-1])
        else:
            table = state.table
            if table.seq_len != seq_len:
                raise RuntimeError(
                    f"raas: row {row} has {table.seq_len} positions, engine {seq_len}"
                )
            prompt, size = table.prompt_len, table.page_size
            page_ids = torch.tensor(state.pages, dtype=torch.int64)
            page_starts = prompt + page_ids * size
            page_lens = torch.clamp(seq_len - page_starts, max=size)
            starts = torch.cat([torch.zeros(1, dtype=torch.int64), page_starts])
            lens = torch.cat([torch.tensor([prompt], dtype=torch.int64), page_lens])
            scored = score and state.needs_scores
            n_pages = page_ids.numel() if scored else 0
            first = page_indptr[-1]
            pages = torch.cat(
                [
                    torch.full((1,), -1, dtype=torch.int64),
                    torch.arange(first, first + n_pages, dtype=torch.int64)
                    if scored
                    else torch.full((page_ids.numel(),), -1, dtype=torch.int64),
                ]
            )
            listed = int(lens.sum())
            if not state.selects_per_layer:
                # The count the host predicts from numbers alone (retention.py): a list
                # that disagrees means the policy state and the plan went apart.
                want = attended_tokens(
                    prompt,
                    table.decode_len,
                    state.config.budget_tokens,
                    size,
                    frees_memory=state.policy.frees_memory,
                )
                if listed != want:
                    raise RuntimeError(f"raas: row {row} lists {listed} tokens, {want} predicted")
            scored_start.append(prompt if scored else listed)
            page_indptr.append(first + n_pages)
        seg_row.append(torch.full((starts.numel(),), row, dtype=torch.int64))
        seg_start.append(starts)
        seg_len.append(lens)
        seg_page.append(pages)
        indptr.append(indptr[-1] + listed)
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64)
        seg_row = seg_start = seg_len = seg_page = [empty]
    return StepLists(
        seg_row=torch.cat(seg_row),
        seg_start=torch.cat(seg_start),
        seg_len=torch.cat(seg_len),
        seg_page=torch.cat(seg_page),
        kv_indptr=torch.tensor(indptr, dtype=torch.int32),
        scored_start=torch.tensor(scored_start, dtype=torch.int32),
        page_indptr=torch.tensor(page_indptr, dtype=torch.int32),
        states=list(states),
    )


def expand_segments(
    lists: StepLists,
    req_to_token: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    page_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each list entry's slot and scored page, on `req_to_token`'s device.

    req_to_token: shape [rows, max_context], the engine's position -> slot table.
    out: optional shape [>= total_tokens], dtype torch.int32, filled in its prefix (a
        CUDA-graph wrapper's static indices buffer).
    page_out: optional like `out`, receives each entry's scored page id or -1.
    Returns (slots [total_tokens] int32, token_page [total_tokens] int64), views of
    `out`/`page_out` when given. Nothing is read back to the host: every size comes from
    the host-side lists.
    """
    device = req_to_token.device
    total = lists.total_tokens
    seg_len = lists.seg_len.to(device, non_blocking=True)
    seg_start = lists.seg_start.to(device, non_blocking=True)
    seg_row = lists.seg_row.to(device, non_blocking=True)
    seg_page = lists.seg_page.to(device, non_blocking=True)
    seg_first = torch.zeros_like(lists.seg_len)
    torch.cumsum(lists.seg_len[:-1], dim=0, out=seg_first[1:])
    seg_first = seg_first.to(device, non_blocking=True)
    seg_of = torch.repeat_interleave(
        torch.arange(seg_len.numel(), device=device), seg_len, output_size=total
    )
    offset = torch.arange(total, device=device) - seg_first[seg_of]
    positions = seg_start[seg_of] + offset
    slots = req_to_token[seg_row[seg_of], positions]
    # A page's entries share its id; -1 (prompt, unscored) stays -1.
    token_page = seg_page[seg_of]
    if out is None:
        out = torch.empty(total, dtype=torch.int32, device=device)
    if out.numel() < total:
        raise ValueError(f"expected an indices buffer of >= {total} entries, got {out.numel()}")
    out[:total].copy_(slots)
    if page_out is not None:
        page_out[:total].copy_(token_page)
        token_page = page_out[:total]
    return out[:total], token_page


@dataclass(frozen=True)
class StepPlan(_StepTotals):
    """The host's sizes of one decode step whose lists the device state builds
    (`RowPolicyState.build_lists`), in the layout `StepLists` describes.

    heads, lengths, page_starts: per request, as `build_lists` takes them.
    kv_indptr, scored_start, page_indptr: shape [B + 1] / [B] / [B + 1], dtype
        torch.int32, host-side.
    """

    heads: list[int]
    lengths: list[int]
    page_starts: list[int]
    kv_indptr: torch.Tensor
    scored_start: torch.Tensor
    page_indptr: torch.Tensor
    states: list[RequestKV | RowPlan | None]


def plan_step(
    rows: Sequence[int],
    seq_lens: Sequence[int],
    states: Sequence[RequestKV | RowPlan | None],
) -> StepPlan:
    """Sizes of the step's lists from the host's counts alone.

    A `RowPlan` lists its prompt and held pages (the device state knows which);
    quest's per-request state and untracked rows (None) list their whole row.
    """
    if not len(rows) == len(seq_lens) == len(states):
        raise ValueError(
            f"expected rows, seq_lens and states of one length, got "
            f"{len(rows)}, {len(seq_lens)}, {len(states)}"
        )
    heads, lengths, counts = [], [], []
    for row, seq_len, state in zip(rows, seq_lens, states, strict=True):
        if isinstance(state, RowPlan):
            if state.seq_len != seq_len:
                raise RuntimeError(
                    f"raas: row {row} has {state.seq_len} positions, engine {seq_len}"
                )
            heads.append(state.list_head)
            lengths.append(state.listed_tokens)
            counts.append(state.scored_pages)
        elif state is None or state.selects_per_layer:
            heads.append(seq_len)
            lengths.append(seq_len)
            counts.append(0)
        else:
            raise RuntimeError(
                f"raas: row {row} holds a {state.config.name} request outside the device state"
            )
    page_indptr = [0]
    for c in counts:
        page_indptr.append(page_indptr[-1] + c)
    kv_indptr = [0]
    for n in lengths:
        kv_indptr.append(kv_indptr[-1] + n)
    return StepPlan(
        heads=heads,
        lengths=lengths,
        page_starts=[page_indptr[i] if c else -1 for i, c in enumerate(counts)],
        kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32),
        scored_start=torch.tensor(
            [h if c else n for h, n, c in zip(heads, lengths, counts, strict=True)],
            dtype=torch.int32,
        ),
        page_indptr=torch.tensor(page_indptr, dtype=torch.int32),
        states=list(states),
    )
