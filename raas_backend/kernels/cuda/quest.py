"""Quest on the GPU: page key bounds, per-layer page selection and index filling.

Quest keeps every page and, at each layer, attends the prompt, the tail page and the
``budget_pages - 1`` other decode pages with the highest upper bound on q.k,
``sum_d max(q_d * kmax_d, q_d * kmin_d) = q+ . kmax + q- . kmin`` (q+ and q- the
positive and negative parts of q), aggregated over query heads by max (the engine's
``head_agg``). Per layer:

1. `quest_scores`: one Triton kernel reads kmin/kmax of every candidate page (two
   tensor-core dots per KV head) and writes the head-max bound, -inf past each row's end;
2. ``torch.topk`` over the padded [B, width] scores (a single launch; FlashInfer has a
   top-k too, but the rows here are short);
3. `quest_fill`: one Triton kernel writes the selected pages' slots into the middle of
   each request's CSR list. The prompt and the tail part of the lists, and therefore the
   indptr, do not change between layers, so the decode plan is made once per step.

Bounds live in a per-layer pool ``kmin``/``kmax`` of shape
[rows, pages_per_row, num_kv_heads, head_dim] in the cache dtype (the min/max of bf16
values is exact in bf16), indexed by the request's ``req_to_token`` row and logical page.
`update_page_bounds` folds the newest token of every request in; `build_page_bounds`
fills a pool from an existing cache.

This is the head-aggregated selection (``quest_selection="layer"``), one list per request.
The paper's per-KV-group selection, quest's default on the CPU path (each KV head attends
its own pages: `raas_backend.request_kv.RequestKV.select_for_layer`), is not here yet, so
the engine refuses quest on CUDA at request validation. It would need: the score kernel
to store each KV head's group bound (``Score[b, h, page]``, the loop over ``h`` without
the max across heads) and ``torch.topk`` over [B, num_kv_heads, width]; one list per
(request, KV head), of the same host-known length (prompt + budget), filled per layer by
`quest_fill` with a head index in its grid; and a decode over per-head lists: FlashInfer
planned for B * num_kv_heads requests of one KV head each (q viewed as [B * num_kv_heads,
group, head_dim], the NHD cache as [slots * num_kv_heads, 1, head_dim], so the list of
(b, h) holds ``slot * num_kv_heads + h``), or the Triton split-KV kernel, whose programs
already run per (request, KV head), reading a per-head list. The lists are num_kv_heads
times longer; the K/V bytes read stay those of budget tokens per KV head, as now.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raas_backend.kernels.cuda.page_mass import group_pad


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@triton.jit
def _quest_score_kernel(
    Q,
    Kmin,
    Kmax,
    Score,
    ReqRows,
    NCand,
    sm_scale,
    width,
    stride_qb,
    stride_qh,
    stride_br,
    stride_bp,
    stride_bh,
    stride_sb,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.load(NCand + b)
    row = tl.load(ReqRows + b).to(tl.int64)
    pages = c * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pages < n
    d = tl.arange(0, D)
    g = tl.arange(0, GP)
    gmask = g < G
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for h in range(HKV):
        q = tl.load(
            Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None],
            other=0.0,
        )
        qp = tl.maximum(q, 0.0).to(q.dtype)
        qn = tl.minimum(q, 0.0).to(q.dtype)
        off = row * stride_br + pages[:, None].to(tl.int64) * stride_bp + h * stride_bh + d[None, :]
        kmx = tl.load(Kmax + off, mask=pm[:, None], other=0.0)
        kmn = tl.load(Kmin + off, mask=pm[:, None], other=0.0)
        bnd = tl.dot(qp, tl.trans(kmx)) + tl.dot(qn, tl.trans(kmn))
        bnd = tl.where(gmask[:, None], bnd, float("-inf"))
        best = tl.maximum(best, tl.max(bnd, axis=0))
    res = tl.where(pm, best * sm_scale, float("-inf"))
    tl.store(Score + b * stride_sb + pages, res, mask=pages < width)


@triton.jit
def _quest_fill_kernel(
    Sel,
    NSel,
    ReqToToken,
    ReqRows,
    PromptLens,
    KvIndptr,
    KvIndices,
    stride_sb,
    stride_rt,
    P: tl.constexpr,
    KB: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    ns = tl.load(NSel + b)
    js = c * KB + tl.arange(0, KB)
    jm = js < ns
    page = tl.load(Sel + b * stride_sb + js, mask=jm, other=0)
    pl = tl.load(PromptLens + b)
    row = tl.load(ReqRows + b).to(tl.int64)
    t = tl.arange(0, P)
    pos = pl + page[:, None] * P + t[None, :]
    slot = tl.load(ReqToToken + row * stride_rt + pos, mask=jm[:, None], other=0)
    dst = tl.load(KvIndptr + b) + pl + js[:, None] * P + t[None, :]
    tl.store(KvIndices + dst, slot.to(tl.int32), mask=jm[:, None])


@triton.jit
def _bounds_update_kernel(
    Kmin,
    Kmax,
    KNew,
    ReqRows,
    PromptLens,
    SeqLens,
    stride_br,
    stride_bp,
    stride_bh,
    stride_kb,
    stride_kh,
    HKV: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
):
    b = tl.program_id(0)
    u = tl.load(SeqLens + b) - 1 - tl.load(PromptLens + b)
    page = (u // P).to(tl.int64)
    first = (u % P) == 0
    h = tl.arange(0, HP)
    d = tl.arange(0, D)
    hm = (h < HKV)[:, None]
    kn = tl.load(KNew + b * stride_kb + h[:, None] * stride_kh + d[None, :], mask=hm, other=0.0)
    row = tl.load(ReqRows + b).to(tl.int64)
    off = row * stride_br + page * stride_bp + h[:, None] * stride_bh + d[None, :]
    lo = tl.load(Kmin + off, mask=hm, other=0.0)
    hi = tl.load(Kmax + off, mask=hm, other=0.0)
    tl.store(Kmin + off, tl.where(first, kn, tl.minimum(lo, kn)), mask=hm)
    tl.store(Kmax + off, tl.where(first, kn, tl.maximum(hi, kn)), mask=hm)


@dataclass
class QuestPlan:
    """One decode step's Quest lists; the middle of each list is refilled per layer.

    Attributes
    ----------
    kv_indptr : shape [B + 1], dtype torch.int32 (device).
    kv_indices : shape [nnz], dtype torch.int32 (device); prompt and tail filled here,
        the ``n_sel[b] * page_size`` entries after the prompt by `quest_fill`.
    kv_indptr_host : shape [B + 1], dtype torch.int32 (CPU).
    n_cand : shape [B], dtype torch.int32: candidate pages (all decode pages but the tail).
    n_sel : shape [B], dtype torch.int32: pages selected per layer (min(budget-1, n_cand)).
    req_rows : shape [B], dtype torch.int64. prompt_lens : shape [B], dtype torch.int32.
    width : host int, max n_cand (score row width). k_sel : host int, max n_sel.
    max_len : host int, the longest list. page_size : host int.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_indptr_host: torch.Tensor
    n_cand: torch.Tensor
    n_sel: torch.Tensor
    req_rows: torch.Tensor
    prompt_lens: torch.Tensor
    width: int
    k_sel: int
    max_len: int
    page_size: int


def plan_quest(
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    budget_pages: int,
) -> QuestPlan:
    """Lists of [prompt | selected pages | tail] for one step; one host sync.

    req_to_token: shape [rows, max_context], integer. req_rows: shape [B], integer.
    prompt_lens, seq_lens: shape [B], dtype int32 (seq_lens counts the newest token;
    every request has at least one decode token). budget_pages: pages attended per step
    including the tail (>= 1). The lists are built by `build_sparse_indices` over a
    placeholder page table (pages 0 .. n_sel-1, then the tail); `quest_fill` overwrites
    the placeholders at every layer.
    """
    from raas_backend.kernels.cuda.indexing import build_sparse_indices

    _expect(budget_pages >= 1, f"expected budget_pages >= 1, got {budget_pages}")
    device = seq_lens.device
    p = page_size
    decode_len = seq_lens - prompt_lens
    tail_page = torch.div(decode_len - 1, p, rounding_mode="floor").to(torch.int32)
    n_cand = tail_page.clamp(min=0)
    n_sel = n_cand.clamp(max=budget_pages - 1)
    col = torch.arange(budget_pages, device=device, dtype=torch.int32)
    pages = torch.where(
        col[None, :] < n_sel[:, None],
        col[None, :],
        torch.where(col[None, :] == n_sel[:, None], tail_page[:, None], -1),
    ).to(torch.int32)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    extra = torch.stack(
        [
            n_cand.max() if n_cand.numel() else zero,
            (decode_len < 1).any().to(torch.int32) if n_cand.numel() else zero,
        ]
    )
    idx = build_sparse_indices(
        req_to_token, req_rows, prompt_lens, seq_lens, pages, n_sel + 1, p, extra_stats=extra
    )
    width, bad = idx.extra_host
    _expect(bad == 0, "expected every request to hold at least one decode token, got none")
    return QuestPlan(
        kv_indptr=idx.kv_indptr,
        kv_indices=idx.kv_indices,
        kv_indptr_host=idx.kv_indptr_host,
        n_cand=n_cand,
        n_sel=n_sel,
        req_rows=req_rows.long(),
        prompt_lens=prompt_lens,
        width=width,
        k_sel=max(idx.layout.max_pages_per_request - 1, 0),
        max_len=idx.max_len,
        page_size=p,
    )


def quest_scores(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    plan: QuestPlan,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    block_p: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Head-max Quest bound of every candidate page.

    q: shape [B, num_qo_heads, head_dim], dtype bfloat16/float16.
    kmin, kmax: shape [rows, pages_per_row, num_kv_heads, head_dim], dtype of q.
    out: optional shape [B, plan.width], dtype torch.float32.
    Returns shape [B, plan.width], dtype torch.float32 (-inf past each row's candidates).
    """
    batch, hq, dim = q.shape
    _expect(
        kmin.shape == kmax.shape,
        f"expected kmax of shape {tuple(kmin.shape)}, got {tuple(kmax.shape)}",
    )
    _expect(
        kmin.dim() == 4 and kmin.shape[3] == dim,
        f"expected bounds of shape [rows, pages, heads, {dim}], got {tuple(kmin.shape)}",
    )
    hkv = kmin.shape[2]
    _expect(hq % hkv == 0, f"expected num_qo_heads divisible by num_kv_heads, got {hq}/{hkv}")
    _expect(
        kmin.stride() == kmax.stride() and kmin.stride(-1) == 1,
        "expected kmin/kmax with equal strides, last dim contiguous",
    )
    width = max(plan.width, 1)
    if out is None:
        out = torch.empty(batch, width, dtype=torch.float32, device=q.device)
    _expect(
        out.shape == (batch, width),
        f"expected out of shape {(batch, width)}, got {tuple(out.shape)}",
    )
    group = hq // hkv
    _quest_score_kernel[(batch, triton.cdiv(width, block_p))](
        q,
        kmin,
        kmax,
        out,
        plan.req_rows,
        plan.n_cand,
        sm_scale,
        width,
        q.stride(0),
        q.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        out.stride(0),
        HKV=hkv,
        G=group,
        GP=group_pad(group),
        D=dim,
        BLOCK_P=block_p,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def quest_fill(
    plan: QuestPlan,
    selected: torch.Tensor,
    req_to_token: torch.Tensor,
    *,
    pages_per_block: int = 16,
) -> None:
    """Write the selected pages' slots into ``plan.kv_indices`` (in place).

    selected: shape [B, >= plan.k_sel], integer page ids; the first ``n_sel[b]`` of row b
        are used (``torch.topk`` puts the real candidates before the -inf padding).
    req_to_token: shape [rows, max_context], integer, last dim contiguous.
    """
    batch = plan.n_sel.numel()
    if batch == 0 or plan.k_sel == 0:
        return
    _expect(
        selected.shape[0] == batch and selected.shape[1] >= plan.k_sel,
        f"expected selected of shape [{batch}, >= {plan.k_sel}], got {tuple(selected.shape)}",
    )
    _expect(req_to_token.stride(-1) == 1, "expected req_to_token with a contiguous last dim")
    p = plan.page_size
    _expect(p & (p - 1) == 0, f"expected a power-of-two page size, got {p}")
    _quest_fill_kernel[(batch, triton.cdiv(plan.k_sel, pages_per_block))](
        selected,
        plan.n_sel,
        req_to_token,
        plan.req_rows,
        plan.prompt_lens,
        plan.kv_indptr,
        plan.kv_indices,
        selected.stride(0),
        req_to_token.stride(0),
        P=p,
        KB=pages_per_block,
    )


def quest_select(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    plan: QuestPlan,
    sm_scale: float,
    req_to_token: torch.Tensor,
    *,
    scores_out: torch.Tensor | None = None,
    block_p: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """One layer's selection: scores, top-k, fill. Returns the scores [B, width] float32."""
    scores = quest_scores(
        q, kmin, kmax, plan, sm_scale, out=scores_out, block_p=block_p, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if plan.k_sel > 0:
        sel = torch.topk(scores, plan.k_sel, dim=1, sorted=True).indices
        quest_fill(plan, sel, req_to_token)
    return scores


def update_page_bounds(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    k_new: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    use_triton: bool | None = None,
) -> None:
    """Fold each request's newest key (position seq_len - 1) into its page's bounds.

    kmin, kmax: shape [rows, pages_per_row, num_kv_heads, head_dim], last dim contiguous.
    k_new: shape [B, num_kv_heads, head_dim], dtype of the bounds, last dim contiguous.
    req_rows: shape [B], integer. prompt_lens, seq_lens: shape [B], integer.
    use_triton: one Triton launch instead of torch indexing; None: on CUDA tensors.
    """
    if use_triton is None:
        use_triton = kmin.is_cuda
    if use_triton:
        batch, hkv, dim = k_new.shape
        _expect(
            kmin.stride() == kmax.stride() and kmin.stride(-1) == 1 and k_new.stride(-1) == 1,
            "expected kmin/kmax with equal strides and contiguous last dims",
        )
        if batch:
            _bounds_update_kernel[(batch,)](
                kmin,
                kmax,
                k_new,
                req_rows,
                prompt_lens,
                seq_lens,
                kmin.stride(0),
                kmin.stride(1),
                kmin.stride(2),
                k_new.stride(0),
                k_new.stride(1),
                HKV=hkv,
                HP=triton.next_power_of_2(hkv),
                D=dim,
                P=page_size,
            )
        return
    u = seq_lens.long() - 1 - prompt_lens.long()
    page = torch.div(u, page_size, rounding_mode="floor")
    first = (u % page_size == 0).view(-1, 1, 1)
    rows = req_rows.long()
    old_min = kmin[rows, page]
    old_max = kmax[rows, page]
    kmin[rows, page] = torch.where(first, k_new, torch.minimum(old_min, k_new))
    kmax[rows, page] = torch.where(first, k_new, torch.maximum(old_max, k_new))


def build_page_bounds(
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    pages_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds pools over every decode token held (the partial tail page included).

    k_buffer: shape [num_slots, num_kv_heads, head_dim]. Other tensors as in `plan_quest`.
    Returns (kmin, kmax), each shape [rows, pages_per_row, num_kv_heads, head_dim], dtype
    of k_buffer; entries of other rows and pages are left at +inf / -inf.
    """
    hkv, dim = k_buffer.shape[1:]
    rows_total = req_to_token.shape[0]
    shape = (rows_total, pages_per_row, hkv, dim)
    dev = k_buffer.device
    kmin = torch.full(shape, float("inf"), dtype=k_buffer.dtype, device=dev)
    kmax = torch.full(shape, float("-inf"), dtype=k_buffer.dtype, device=dev)
    p = page_size
    decode_len = seq_lens.long() - prompt_lens.long()
    for_pages = torch.div(decode_len + p - 1, p, rounding_mode="floor")
    total = int(for_pages.sum())
    if total == 0:
        return kmin, kmax
    batch = req_rows.numel()
    req = torch.repeat_interleave(torch.arange(batch, device=dev), for_pages, output_size=total)
    start = torch.zeros(batch, dtype=torch.int64, device=dev)
    start[1:] = torch.cumsum(for_pages, 0)[:-1]
    page = torch.arange(total, device=dev) - start[req]
    within = page[:, None] * p + torch.arange(p, device=dev)[None, :]
    held = within < decode_len[req][:, None]
    pos = prompt_lens.long()[req][:, None] + torch.where(held, within, torch.zeros_like(within))
    slots = req_to_token[req_rows.long()[req][:, None], pos]
    keys = k_buffer[slots.reshape(-1)].view(total, p, hkv, dim)
    mask = held[:, :, None, None]
    inf = torch.tensor(float("inf"), dtype=k_buffer.dtype, device=dev)
    rows = req_rows.long()[req]
    kmin[rows, page] = torch.where(mask, keys, inf).amin(dim=1)
    kmax[rows, page] = torch.where(mask, keys, -inf).amax(dim=1)
    return kmin, kmax
