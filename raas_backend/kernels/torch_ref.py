"""Sparse-page decode attention and page scoring in plain torch.

The CPU path of the `raas` backend and the oracle the CUDA kernels are tested against.
Softmax and accumulation run in float32 whatever the cache dtype.
"""

from __future__ import annotations

import torch


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    kv_head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's decode attention over gathered keys/values.

    q: shape [num_qo_heads, head_dim]; k, v: shape [n, num_kv_heads, head_dim].
    kv_head_mask: shape [n, num_kv_heads], dtype torch.bool, or None: which tokens each
        KV head (and the query heads of its group) attends; None: all of them. Every
        head must see at least one token.
    Returns (out: [num_qo_heads, head_dim] in q's dtype, probs: [num_qo_heads, n] float32).
    """
    hq, d = q.shape
    n, hkv, dk = k.shape
    _check(dk == d, f"expected key head_dim {d}, got {dk}")
    _check(hq % hkv == 0, f"expected num_qo_heads divisible by num_kv_heads, got {hq}/{hkv}")
    group = hq // hkv
    qf = q.float().view(hkv, group, d)
    # Keys and values stay [n, hkv, d] in memory: viewed as [hkv, n, d], the head dim is
    # the contiguous one, which is the layout BLAS runs fastest (5x over [hkv, d, n]).
    kf = k.float().permute(1, 0, 2)
    vf = v.float().permute(1, 0, 2)
    logits = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [hkv, group, n]
    if kv_head_mask is not None:
        _check(
            tuple(kv_head_mask.shape) == (n, hkv),
            f"expected kv_head_mask of shape {(n, hkv)}, got {tuple(kv_head_mask.shape)}",
        )
        logits.masked_fill_(~kv_head_mask.T.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, vf).reshape(hq, d)
    return out.to(q.dtype), probs.reshape(hq, n)


def page_mass(probs: torch.Tensor, token_page: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Attention mass of each page: probs summed over the tokens of the page.

    probs: shape [num_qo_heads, n] float32; token_page: shape [n], int64 page id in
    [0, num_pages) or -1 (not scored). Returns shape [num_pages, num_qo_heads] float32.
    """
    acc = torch.zeros(probs.shape[0], num_pages + 1, dtype=torch.float32, device=probs.device)
    # Unscored tokens land in a spare last column: no mask, no gathered copy of probs.
    acc.index_add_(1, torch.where(token_page >= 0, token_page, num_pages), probs)
    return acc[:, :num_pages].T


def sparse_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    token_page: torch.Tensor | None = None,
    num_pages: int = 0,
    kv_head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention for a batch over each request's retained slots.

    q: shape [batch, num_qo_heads, head_dim].
    k_buffer, v_buffer: shape [num_slots, num_kv_heads, head_dim] (the engine's pool).
    kv_indptr: shape [batch + 1], dtype int64; request b reads
        kv_indices[kv_indptr[b]:kv_indptr[b+1]].
    kv_indices: shape [nnz], dtype int64, slots in the pool.
    token_page: shape [nnz], dtype int64, the scored page (global id in [0, num_pages))
        of each listed token, or -1 for tokens that are not scored. None: no scoring.
    kv_head_mask: shape [nnz, num_kv_heads], dtype torch.bool, or None: which KV heads
        attend each listed token (quest per KV group); None: every head attends all.
    Returns (out: [batch, num_qo_heads, head_dim], page_mass: [num_pages, num_qo_heads]
    float32, or None without token_page): the attention probability mass of each page.
    """
    batch = q.shape[0]
    _check(
        kv_indptr.numel() == batch + 1,
        f"expected kv_indptr of {batch + 1}, got {kv_indptr.numel()}",
    )
    out = torch.empty_like(q)
    # Zero-width start: a batch of none still gets a [num_pages, heads] mass of zeros.
    all_probs = [torch.zeros(q.shape[1], 0, dtype=torch.float32, device=q.device)]
    bounds = kv_indptr.tolist()
    for b in range(batch):
        lo, hi = bounds[b], bounds[b + 1]
        idx = kv_indices[lo:hi]
        # index_select copies whole rows; advanced indexing goes element by element (4x).
        keys = k_buffer.index_select(0, idx)
        values = v_buffer.index_select(0, idx)
        mask = None if kv_head_mask is None else kv_head_mask[lo:hi]
        o, probs = attend_one(q[b], keys, values, sm_scale, mask)
        out[b] = o
        if token_page is not None:
            all_probs.append(probs)
    mass = None
    if token_page is not None:
        # Requests' probabilities side by side line up with token_page's global page ids.
        mass = page_mass(torch.cat(all_probs, dim=1), token_page, num_pages)
    return out, mass


def page_key_bounds(
    k: torch.Tensor, token_page: torch.Tensor, num_pages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page elementwise min and max of keys.

    k: shape [n, num_kv_heads, head_dim]; token_page: shape [n], int64 in [0, num_pages).
    Returns (kmin, kmax), each shape [num_pages, num_kv_heads, head_dim] float32.
    """
    shape = (num_pages, *k.shape[1:])
    kf = k.float()
    idx = token_page.view(-1, 1, 1).expand_as(kf)
    kmin = torch.full(shape, float("inf"), device=k.device).scatter_reduce(0, idx, kf, "amin")
    kmax = torch.full(shape, float("-inf"), device=k.device).scatter_reduce(0, idx, kf, "amax")
    return kmin, kmax


def quest_bounds(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """Quest's upper bound on q.k per page and query head.

    q: shape [num_qo_heads, head_dim]; kmin, kmax: shape [pages, num_kv_heads, head_dim].
    Returns shape [pages, num_qo_heads] float32: sum_d max(q_d*kmin_d, q_d*kmax_d) * scale.
    """
    hq, d = q.shape
    hkv = kmin.shape[1]
    qf = q.float().view(1, hkv, hq // hkv, d)
    lo = qf * kmin.unsqueeze(2)
    hi = qf * kmax.unsqueeze(2)
    return torch.maximum(lo, hi).sum(-1).reshape(kmin.shape[0], hq) * sm_scale
