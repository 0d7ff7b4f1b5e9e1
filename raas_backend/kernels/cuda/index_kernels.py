"""Triton kernels behind `raas_backend.kernels.cuda.indexing.build_sparse_indices` on CUDA.

Two launches replace some twenty torch operations: `list_lengths` (one program per
request: list length and a validity flag from its page row) and `fill_lists` (slots and
page ids of every list entry, one program per request and block of entries).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lens_kernel(
    Pages,
    NumPages,
    PromptLens,
    SeqLens,
    Lens,
    Stats,
    cap,
    stride_pg,
    P: tl.constexpr,
    CAP: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.load(NumPages + b)
    pl = tl.load(PromptLens + b)
    dl = tl.load(SeqLens + b) - pl
    i = tl.arange(0, CAP)
    listed = i < n
    pages = tl.load(Pages + b.to(tl.int64) * stride_pg + i, mask=listed & (i < cap), other=0)
    tok = tl.minimum(tl.maximum(dl - pages * P, 0), P)
    tok = tl.where(listed, tok, 0)
    bad = tl.sum((listed & (tok == 0)).to(tl.int32), axis=0)
    bad += tl.sum(((i < n - 1) & (tok < P)).to(tl.int32), axis=0)
    bad += (n > cap).to(tl.int32) + (dl < 0).to(tl.int32)
    length = pl + tl.sum(tok, axis=0)
    tl.store(Lens + b, length)
    tl.atomic_max(Stats + 0, bad)
    tl.atomic_max(Stats + 1, length)
    tl.atomic_max(Stats + 2, n)


@triton.jit
def _fill_kernel(
    ReqToToken,
    ReqRows,
    PromptLens,
    Pages,
    KvIndptr,
    PageIndptr,
    KvIndices,
    TokenPage,
    stride_rt,
    stride_pg,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    start = tl.load(KvIndptr + b)
    length = tl.load(KvIndptr + b + 1) - start
    t = c * BLOCK + tl.arange(0, BLOCK)
    m = t < length
    pl = tl.load(PromptLens + b)
    in_prompt = t < pl
    u = tl.maximum(t - pl, 0)
    i = u // P
    page = tl.load(Pages + b.to(tl.int64) * stride_pg + i, mask=m & ~in_prompt, other=0)
    pos = tl.where(in_prompt, t, pl + page * P + (u - i * P))
    row = tl.load(ReqRows + b).to(tl.int64)
    slot = tl.load(ReqToToken + row * stride_rt + pos, mask=m, other=0)
    tl.store(KvIndices + start + t, slot.to(tl.int32), mask=m)
    tp = tl.where(in_prompt, -1, tl.load(PageIndptr + b) + i)
    tl.store(TokenPage + start + t, tp.to(tl.int32), mask=m)


def list_lengths(
    pages: torch.Tensor,
    num_pages: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lens: shape [B] int32, stats: shape [3] int32 = [rule breaks > 0, max length,
    max num_pages]).

    pages: shape [B, cap], dtype torch.int32; the rest shape [B], dtype torch.int32.
    """
    batch, cap = pages.shape
    lens = torch.empty(batch, dtype=torch.int32, device=pages.device)
    stats = torch.zeros(3, dtype=torch.int32, device=pages.device)
    if batch:
        _lens_kernel[(batch,)](
            pages,
            num_pages,
            prompt_lens,
            seq_lens,
            lens,
            stats,
            cap,
            pages.stride(0),
            P=page_size,
            CAP=triton.next_power_of_2(max(cap, 2)),
        )
    return lens, stats


def fill_lists(
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    page_indptr: torch.Tensor,
    nnz: int,
    max_len: int,
    page_size: int,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indices, token_page), each shape [nnz], dtype torch.int32.

    req_to_token: shape [rows, max_context], int32/int64, last dim contiguous.
    req_rows: shape [B], integer. prompt_lens: shape [B], int32. pages: shape [B, cap],
    int32. kv_indptr, page_indptr: shape [B + 1], int32 (exclusive prefix sums).
    """
    device = pages.device
    kv_indices = torch.empty(nnz, dtype=torch.int32, device=device)
    token_page = torch.empty(nnz, dtype=torch.int32, device=device)
    batch = pages.shape[0]
    if batch and nnz:
        _fill_kernel[(batch, triton.cdiv(max_len, block))](
            req_to_token,
            req_rows,
            prompt_lens,
            pages,
            kv_indptr,
            page_indptr,
            kv_indices,
            token_page,
            req_to_token.stride(0),
            pages.stride(0),
            P=page_size,
            BLOCK=block,
        )
    return kv_indices, token_page
