"""Fused sparse decode attention with exact per-page mass, in one pass over K/V (Triton).

Split-KV ("flash decoding") over each request's CSR list of slots: program
(request b, KV head h, split s) walks tiles of ``BLOCK_T`` list entries with an online
softmax and writes a partial output and LSE; a merge kernel combines the splits. The
tiles are laid out so that scored tiles start at page boundaries (prompt tiles first,
then page tiles from ``scored_start``), so each page's log-sum-exp
``log2 sum_t exp2(s_t)`` falls out of the tile's logits with a reshape; the merge kernel
turns it into the page's mass ``exp2(page_lse - lse)``. K and V are read once, as in
plain attention: the scoring costs no extra pass over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raas_backend.kernels.cuda.indexing import PageLayout
from raas_backend.kernels.cuda.page_mass import LOG2E, group_pad


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    Idx,
    KvIndptr,
    ScoredStart,
    PageIndptr,
    OPart,
    LsePart,
    PageLse,
    qk_scale,
    tiles_per_split,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_pp,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SCORE: tl.constexpr,
    PAGE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    start = tl.load(KvIndptr + b)
    length = tl.load(KvIndptr + b + 1) - start
    ss = tl.load(ScoredStart + b)
    p0 = tl.load(PageIndptr + b)
    npg = tl.load(PageIndptr + b + 1) - p0
    n_prompt_tiles = tl.cdiv(ss, BLOCK_T)
    n_tiles = n_prompt_tiles + tl.cdiv(length - ss, BLOCK_T)
    t0 = sp * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)

    g = tl.arange(0, GP)
    gmask = g < G
    heads = h * G + g
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    offs = tl.arange(0, BLOCK_T)
    for t in range(t0, t1):
        is_page = t >= n_prompt_tiles
        base = tl.where(is_page, ss + (t - n_prompt_tiles) * BLOCK_T, t * BLOCK_T)
        lim = tl.where(is_page, length, ss)
        rows = base + offs
        valid = rows < lim
        slot = tl.load(Idx + start + rows, mask=valid, other=0).to(tl.int64)
        k = tl.load(
            K + slot[:, None] * stride_ks + h * stride_kh + d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SCORE:
            # A page's log2-sum-exp2 from the same exponentials, relative to m_new (a page
            # far below m_new underflows to mass 0, i.e. < 2^-126 of the row's mass).
            if PAGE_DOT:
                # Sum per page with a tensor-core dot against a 0/1 page-indicator matrix
                # (16 columns, the dot minimum); p in bf16/fp16 as for the PV product.
                cols = tl.arange(0, 16)
                ind = ((offs[:, None] // P) == cols[None, :]).to(V.dtype.element_ty)
                ps = tl.dot(p.to(V.dtype.element_ty), ind)
                pages = (t - n_prompt_tiles) * (BLOCK_T // P) + cols
                pvalid = is_page & (cols < BLOCK_T // P) & (pages < npg)
            else:
                ps = tl.sum(tl.reshape(p, (GP, BLOCK_T // P, P)), axis=2)
                pages = (t - n_prompt_tiles) * (BLOCK_T // P) + tl.arange(0, BLOCK_T // P)
                pvalid = is_page & (pages < npg)
            page_lse = m_new[:, None] + tl.log2(ps)
            tl.store(
                PageLse + (p0 + pages)[None, :] * stride_pp + heads[:, None],
                page_lse,
                mask=gmask[:, None] & pvalid[None, :],
            )
        v = tl.load(
            V + slot[:, None] * stride_vs + h * stride_vh + d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = t1 > t0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(
        OPart + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :],
        o,
        mask=gmask[:, None],
    )
    tl.store(LsePart + b * stride_lb + heads * stride_lh + sp, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    OPart,
    LsePart,
    Out,
    LseOut,
    PageLse,
    Mass,
    Acc,
    PageIndptr,
    num_splits,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_outb,
    stride_outh,
    stride_lob,
    stride_pp,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    gmask = g < G
    heads = h * G + g
    d = tl.arange(0, D)
    m = tl.full([GP], float("-inf"), tl.float32)
    den = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for sp in range(0, num_splits):
        ls = tl.load(
            LsePart + b * stride_lb + heads * stride_lh + sp, mask=gmask, other=float("-inf")
        )
        o = tl.load(
            OPart + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :],
            mask=gmask[:, None],
            other=0.0,
        )
        m_new = tl.maximum(m, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m - m_safe)
        w_new = tl.exp2(ls - m_safe)
        acc = acc * w_old[:, None] + o * w_new[:, None]
        den = den * w_old + w_new
        m = m_new
    den_safe = tl.where(den > 0.0, den, 1.0)
    out = acc / den_safe[:, None]
    lse = m + tl.log2(den_safe)
    tl.store(
        Out + b * stride_outb + heads[:, None] * stride_outh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=gmask[:, None],
    )
    tl.store(LseOut + b * stride_lob + heads, lse, mask=gmask)
    if SCORE:
        p0 = tl.load(PageIndptr + b)
        npg = tl.load(PageIndptr + b + 1) - p0
        for pb in range(0, tl.cdiv(npg, BLOCK_P)):
            pages = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pv = pages < npg
            msk = pv[:, None] & gmask[None, :]
            ptr = (p0 + pages)[:, None] * stride_pp + heads[None, :]
            pl = tl.load(PageLse + ptr, mask=msk, other=float("-inf"))
            mass = tl.exp2(pl - lse[None, :])
            tl.store(Mass + ptr, mass, mask=msk)
            if HAS_ACC:
                best = tl.max(tl.where(msk, mass, 0.0), axis=1)
                tl.atomic_max(Acc + p0 + pages, best, mask=pv)


@dataclass(frozen=True)
class TritonDecodeConfig:
    """Tiling of the fused kernel (defaults: the fastest measured on an H200 for
    32/8/128 and 28/4/128 heads, batch 32, budget 2K; see docs/benchmarks.md).

    block_t : list entries per tile (a multiple of the page size, a power of two).
    target_programs : split the lists until B * num_kv_heads * splits reaches this.
    num_warps, num_stages : Triton launch parameters of the split kernel.
    page_dot : sum each page's probabilities with a tensor-core dot (p rounded to the
        cache dtype, ~1e-3 relative error in the mass) instead of a float32 reshape-sum.
    """

    block_t: int = 64
    target_programs: int = 512
    num_warps: int = 2
    num_stages: int = 3
    page_dot: bool = True


def plan_splits(
    max_len: int, batch: int, num_kv_heads: int, config: TritonDecodeConfig
) -> tuple[int, int]:
    """(tiles_per_split, num_splits) for the longest list (prompt + page tiles)."""
    max_tiles = triton.cdiv(max(max_len, 1), config.block_t) + 1
    want = max(1, triton.cdiv(config.target_programs, max(1, batch * num_kv_heads)))
    tiles_per_split = max(1, triton.cdiv(max_tiles, want))
    return tiles_per_split, triton.cdiv(max_tiles, tiles_per_split)


def fused_sparse_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    layout: PageLayout,
    sm_scale: float,
    max_len: int,
    *,
    score: bool = True,
    head_max_into: torch.Tensor | None = None,
    mass_out: torch.Tensor | None = None,
    config: TritonDecodeConfig | None = None,
    workspace: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode attention over the CSR lists, with the page mass fused in.

    q: shape [B, num_qo_heads, head_dim], dtype bfloat16/float16 (last dim contiguous).
    k_buffer, v_buffer: shape [num_slots, num_kv_heads, head_dim], dtype of q.
    kv_indptr: shape [B + 1], dtype torch.int32. kv_indices: shape [nnz], dtype torch.int32.
    layout: the page layout of the lists (scored pages start at ``scored_start``).
    max_len: host int >= the longest list (sizes the split grid).
    head_max_into: optional shape [layout.num_pages], dtype torch.float32, >= 0.
    mass_out: optional shape [layout.num_pages, num_qo_heads], dtype torch.float32.
    workspace: optional dict reused across calls for the partial buffers.
    Returns (out: [B, num_qo_heads, head_dim] dtype of q, lse: [B, num_qo_heads] float32
    base 2, page_mass: [layout.num_pages, num_qo_heads] float32 or None if not score).
    """
    cfg = config or TritonDecodeConfig()
    batch, hq, dim = q.shape
    _, hkv, dk = k_buffer.shape
    _expect(dk == dim, f"expected k_buffer head_dim {dim}, got {dk}")
    _expect(
        v_buffer.shape == k_buffer.shape,
        f"expected v_buffer of shape {tuple(k_buffer.shape)}, got {tuple(v_buffer.shape)}",
    )
    _expect(hq % hkv == 0, f"expected num_qo_heads divisible by num_kv_heads, got {hq}/{hkv}")
    _expect(
        kv_indptr.numel() == batch + 1,
        f"expected kv_indptr of {batch + 1}, got {kv_indptr.numel()}",
    )
    _expect(kv_indices.dtype == torch.int32, f"expected int32 kv_indices, got {kv_indices.dtype}")
    _expect(kv_indptr.dtype == torch.int32, f"expected int32 kv_indptr, got {kv_indptr.dtype}")
    p = layout.page_size
    _expect(
        cfg.block_t % p == 0
        and cfg.block_t >= 16
        and cfg.block_t & (cfg.block_t - 1) == 0
        and (not cfg.page_dot or cfg.block_t // p <= 16),
        f"expected block_t a power of two >= 16 and a multiple of page size {p}, got {cfg.block_t}",
    )
    _expect(
        q.stride(-1) == 1 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1,
        "expected last dims contiguous",
    )
    group = hq // hkv
    gp = group_pad(group)
    tps, splits = plan_splits(max_len, batch, hkv, cfg)
    ws = workspace if workspace is not None else {}

    def buf(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = ws.get(name)
        n = 1
        for s in shape:
            n *= s
        if t is None or t.numel() < n or t.dtype != dtype or t.device != q.device:
            t = torch.empty(max(n, 1), dtype=dtype, device=q.device)
            ws[name] = t
        return t[:n].view(shape)

    o_part = buf("o_part", (batch, hq, splits, dim), torch.float32)
    lse_part = buf("lse_part", (batch, hq, splits), torch.float32)
    page_lse = buf("page_lse", (max(layout.num_pages, 1), hq), torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    mass = None
    if score:
        mass = mass_out
        if mass is None:
            mass = torch.empty(layout.num_pages, hq, dtype=torch.float32, device=q.device)
        _expect(
            mass.shape == (layout.num_pages, hq) and mass.dtype == torch.float32,
            f"expected mass_out of shape {(layout.num_pages, hq)} float32, got "
            f"{tuple(mass.shape)} {mass.dtype}",
        )
    if batch == 0:
        return out, lse, mass
    do_score = score and layout.num_pages > 0
    qk_scale = sm_scale * LOG2E
    _split_kernel[(batch, hkv, splits)](
        q,
        k_buffer,
        v_buffer,
        kv_indices,
        kv_indptr,
        layout.scored_start,
        layout.page_indptr,
        o_part,
        lse_part,
        page_lse,
        qk_scale,
        tps,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        page_lse.stride(0),
        G=group,
        GP=gp,
        D=dim,
        P=p,
        BLOCK_T=cfg.block_t,
        SCORE=do_score,
        PAGE_DOT=cfg.page_dot,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    mass_arg = mass if (do_score and mass is not None) else page_lse
    _merge_kernel[(batch, hkv)](
        o_part,
        lse_part,
        out,
        lse,
        page_lse,
        mass_arg,
        head_max_into if head_max_into is not None else mass_arg,
        layout.page_indptr,
        splits,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        page_lse.stride(0),
        G=group,
        GP=gp,
        D=dim,
        BLOCK_P=64,
        SCORE=do_score,
        HAS_ACC=do_score and head_max_into is not None,
        num_warps=4,
    )
    return out, lse, mass
