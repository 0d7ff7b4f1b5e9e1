"""Exact per-page attention mass from a decode kernel's log-sum-exp (Triton).

After a decode kernel that returns the base-2 LSE of each query head
(``lse = m + log2(sum_t exp2(s_t - m))`` with ``s_t = q.k_t * sm_scale * log2(e)``),
the probability of token t is ``exp2(s_t - lse)``. This kernel re-reads only K of the
scored tokens, recomputes ``s_t`` and sums the probabilities page by page. Each
program owns whole pages of one request and one KV head, so every output element is
written exactly once (no atomics, no zero fill); the optional head-max accumulator uses
one float atomic max per page and KV head.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from raas_backend.kernels.cuda.indexing import PageLayout

LOG2E = math.log2(math.e)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@triton.jit
def _page_mass_kernel(
    Q,
    K,
    Idx,
    Lse,
    KvIndptr,
    ScoredStart,
    PageIndptr,
    Mass,
    Acc,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_lb,
    stride_mp,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    PPB: tl.constexpr,
    HAS_ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    p0 = tl.load(PageIndptr + b)
    npg = tl.load(PageIndptr + b + 1) - p0
    if c * PPB < npg:
        start = tl.load(KvIndptr + b)
        end = tl.load(KvIndptr + b + 1)
        ss = tl.load(ScoredStart + b)
        rows = start + ss + c * (PPB * P) + tl.arange(0, PPB * P)
        valid = rows < end
        slot = tl.load(Idx + rows, mask=valid, other=0).to(tl.int64)
        d = tl.arange(0, D)
        k = tl.load(
            K + slot[:, None] * stride_ks + h * stride_kh + d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        g = tl.arange(0, GP)
        gmask = g < G
        heads = h * G + g
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, PPB*P], log2 units
        lse = tl.load(Lse + b * stride_lb + heads, mask=gmask, other=0.0)
        prob = tl.exp2(s - lse[:, None])
        prob = tl.where(valid[None, :] & gmask[:, None], prob, 0.0)
        pm = tl.sum(tl.reshape(prob, (GP, PPB, P)), axis=2)  # [GP, PPB]
        pages = c * PPB + tl.arange(0, PPB)
        pvalid = pages < npg
        tl.store(
            Mass + (p0 + pages)[None, :] * stride_mp + heads[:, None],
            pm,
            mask=gmask[:, None] & pvalid[None, :],
        )
        if HAS_ACC:
            best = tl.max(tl.where(gmask[:, None], pm, 0.0), axis=0)
            tl.atomic_max(Acc + p0 + pages, best, mask=pvalid)


def group_pad(group: int) -> int:
    """Rows of the padded query tile for a GQA group (tensor-core minimum 16)."""
    return max(16, triton.next_power_of_2(group))


def page_mass_from_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    lse: torch.Tensor,
    layout: PageLayout,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    head_max_into: torch.Tensor | None = None,
    pages_per_block: int = 4,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Per-page attention mass of every query head.

    q: shape [B, num_qo_heads, head_dim], dtype bfloat16/float16 (last dim contiguous).
    k_buffer: shape [num_slots, num_kv_heads, head_dim], dtype of q (last dim contiguous).
    kv_indptr: shape [B + 1], dtype torch.int32. kv_indices: shape [nnz], dtype torch.int32.
    lse: shape [B, num_qo_heads], dtype torch.float32, base 2 of logits scaled by
        sm_scale * log2(e) (FlashInfer's ``return_lse``).
    layout: where the pages lie in the lists (`PageLayout`).
    out: optional shape [layout.num_pages, num_qo_heads], dtype torch.float32.
    head_max_into: optional shape [layout.num_pages], dtype torch.float32, >= 0: receives
        ``max(head_max_into, max over heads of mass)`` (RaaS's max-over-heads and layers).
    Returns ``out``: shape [layout.num_pages, num_qo_heads], dtype torch.float32.
    """
    batch, hq, dim = q.shape
    _, hkv, dk = k_buffer.shape
    _expect(dk == dim, f"expected k_buffer head_dim {dim}, got {dk}")
    _expect(hq % hkv == 0, f"expected num_qo_heads divisible by num_kv_heads, got {hq}/{hkv}")
    _expect(
        lse.shape == (batch, hq), f"expected lse of shape {(batch, hq)}, got {tuple(lse.shape)}"
    )
    _expect(lse.dtype == torch.float32, f"expected float32 lse, got {lse.dtype}")
    _expect(
        kv_indptr.numel() == batch + 1,
        f"expected kv_indptr of {batch + 1}, got {kv_indptr.numel()}",
    )
    _expect(kv_indices.dtype == torch.int32, f"expected int32 kv_indices, got {kv_indices.dtype}")
    _expect(q.stride(-1) == 1 and k_buffer.stride(-1) == 1, "expected last dims contiguous")
    page_size = layout.page_size
    _expect(
        page_size >= 1 and page_size & (page_size - 1) == 0,
        f"expected a power-of-two page size, got {page_size}",
    )
    if out is None:
        out = torch.empty(layout.num_pages, hq, dtype=torch.float32, device=q.device)
    _expect(
        out.shape == (layout.num_pages, hq) and out.dtype == torch.float32,
        f"expected out of shape {(layout.num_pages, hq)} float32, got "
        f"{tuple(out.shape)} {out.dtype}",
    )
    if head_max_into is not None:
        _expect(
            head_max_into.shape == (layout.num_pages,) and head_max_into.dtype == torch.float32,
            f"expected head_max_into of shape ({layout.num_pages},) float32, got "
            f"{tuple(head_max_into.shape)} {head_max_into.dtype}",
        )
    if layout.num_pages == 0 or batch == 0:
        return out
    group = hq // hkv
    ppb = max(1, pages_per_block)
    # The tile must be at least 16 tokens for tl.dot.
    while ppb * page_size < 16:
        ppb *= 2
    chunks = triton.cdiv(layout.max_pages_per_request, ppb)
    lse_c = lse.contiguous()
    _page_mass_kernel[(batch, hkv, chunks)](
        q,
        k_buffer,
        kv_indices,
        lse_c,
        kv_indptr,
        layout.scored_start,
        layout.page_indptr,
        out,
        head_max_into if head_max_into is not None else out,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        lse_c.stride(0),
        out.stride(0),
        G=group,
        GP=group_pad(group),
        D=dim,
        P=page_size,
        PPB=ppb,
        HAS_ACC=head_max_into is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
