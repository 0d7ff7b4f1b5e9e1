"""CSR index building for sparse-page decode, vectorized over the batch.

Pure torch: the same code runs on the GPU (the decode path) and on the CPU (tests).
Nothing here loops over requests in Python.

Batched page tables
-------------------
A batch of B requests is described by device tensors:

- ``req_to_token``: shape [rows, max_context], dtype int32 or int64. The engine's table
  of slots: row r, position p -> slot in the per-layer K/V pools (SGLang's layout).
- ``req_rows``: shape [B], dtype int64 or int32. Each request's row in ``req_to_token``.
- ``prompt_lens``: shape [B], dtype int32. Prompt positions ``0 .. prompt_len-1`` are
  always attended and never scored.
- ``seq_lens``: shape [B], dtype int32. Positions held, the newest token included.
- ``pages``: shape [B, cap], dtype int32. Retained decode pages of each request as
  logical page ids, ascending, padded with -1. Page k covers positions
  ``[prompt_len + k*P, prompt_len + (k+1)*P)`` clipped to ``seq_len``; only the tail
  page (the newest) may be partial, so it is always the last one listed.
- ``num_pages``: shape [B], dtype int32. Listed pages per request.

The CSR list of request b is its prompt, then its listed pages in order; scored pages get
global ids ``page_indptr[b] + i`` (i = index in the request's list), the same numbering
as ``PageTable.token_pages`` with the per-request offsets added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_1d(name: str, t: torch.Tensor, n: int | None = None) -> None:
    _expect(t.dim() == 1, f"expected {name} to be 1-D, got shape {tuple(t.shape)}")
    if n is not None:
        _expect(t.numel() == n, f"expected {name} of {n} elements, got {t.numel()}")


@dataclass(frozen=True)
class PageLayout:
    """Where the scored pages of each request lie in a CSR token list.

    Request b's list is ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``; its entries from
    offset ``scored_start[b]`` on are its pages, ``page_size`` entries each (the last may
    be shorter), with global page ids ``page_indptr[b] ..  page_indptr[b+1] - 1``.
    Entries before ``scored_start[b]`` (the prompt) are attended but not scored.

    Attributes
    ----------
    page_size : tokens per logical page (P).
    scored_start : shape [B], dtype torch.int32, on the decode device.
    page_indptr : shape [B + 1], dtype torch.int32, on the decode device.
    num_pages : host int, ``page_indptr[-1]``.
    max_pages_per_request : host int, the largest ``page_indptr[b+1] - page_indptr[b]``.
    """

    page_size: int
    scored_start: torch.Tensor
    page_indptr: torch.Tensor
    num_pages: int
    max_pages_per_request: int

    def page_request(self) -> torch.Tensor:
        """The request of every global page. shape: [num_pages], dtype: torch.int64"""
        counts = (self.page_indptr[1:] - self.page_indptr[:-1]).long()
        batch = torch.arange(counts.numel(), device=counts.device)
        return torch.repeat_interleave(batch, counts, output_size=self.num_pages)


@dataclass(frozen=True)
class SparseIndices:
    """One decode step's CSR token lists and page layout.

    Attributes
    ----------
    kv_indptr : shape [B + 1], dtype torch.int32, on the decode device.
    kv_indices : shape [nnz], dtype torch.int32, slots in the K/V pools.
    token_page : shape [nnz], dtype torch.int32, global page id of each entry or -1
        (the ``token_page`` argument of ``torch_ref.sparse_decode``).
    kv_indptr_host : shape [B + 1], dtype torch.int32, on the CPU (for planners).
    layout : the page layout of the lists.
    max_len : host int, the longest list.
    extra_host : the ``extra_stats`` passed to the builder, copied to the CPU.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    token_page: torch.Tensor
    kv_indptr_host: torch.Tensor
    layout: PageLayout
    max_len: int
    extra_host: list[int]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.numel() + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(x.long(), dim=0, out=out[1:])
    return out


def page_tokens(
    pages: torch.Tensor,
    num_pages: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> torch.Tensor:
    """Tokens held by each listed page (0 for padding).

    pages: shape [B, cap], dtype int32; num_pages, prompt_lens, seq_lens: shape [B], int32.
    Returns shape [B, cap], dtype torch.int64.
    """
    cap = pages.shape[1]
    col = torch.arange(cap, device=pages.device)
    listed = col[None, :] < num_pages[:, None].long()
    decode_len = (seq_lens - prompt_lens).long()
    tok = (decode_len[:, None] - pages.long() * page_size).clamp(0, page_size)
    return torch.where(listed, tok, torch.zeros_like(tok))


def build_sparse_indices(
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    pages: torch.Tensor,
    num_pages: torch.Tensor,
    page_size: int,
    *,
    validate: bool = True,
    use_triton: bool | None = None,
    extra_stats: torch.Tensor | None = None,
) -> SparseIndices:
    """CSR lists (prompt + listed pages) for a batch, built on the tables' device.

    Tensor arguments are the batched page tables described in the module docstring
    (prompt_lens, seq_lens, num_pages, pages: int32). One device-to-host copy (indptrs,
    maxima and the validity flag) is the only sync. use_triton: the two Triton kernels
    of `index_kernels` instead of torch operations; None: on CUDA tensors.
    extra_stats: optional shape [k], dtype torch.int32, on the tables' device: copied to
    the host with the same sync (returned as ``extra_host``).
    """
    _expect(page_size >= 1, f"expected page_size >= 1, got {page_size}")
    _expect(
        req_to_token.dim() == 2,
        f"expected req_to_token of shape [rows, max_context], got {tuple(req_to_token.shape)}",
    )
    batch = req_rows.numel()
    _check_1d("req_rows", req_rows)
    for name, t in (("prompt_lens", prompt_lens), ("seq_lens", seq_lens), ("num_pages", num_pages)):
        _check_1d(name, t, batch)
        _expect(t.dtype == torch.int32, f"expected {name} of dtype int32, got {t.dtype}")
    _expect(
        pages.dim() == 2 and pages.shape[0] == batch and pages.dtype == torch.int32,
        f"expected int32 pages of shape [{batch}, cap], got {pages.dtype} {tuple(pages.shape)}",
    )
    device = pages.device
    cap = pages.shape[1]
    if use_triton is None:
        use_triton = pages.is_cuda
    if use_triton:
        from raas_backend.kernels.cuda.index_kernels import fill_lists, list_lengths

        lens, stats = list_lengths(pages, num_pages, prompt_lens, seq_lens, page_size)
    else:
        tok = page_tokens(pages, num_pages, prompt_lens, seq_lens, page_size)
        lens = (prompt_lens.long() + tok.sum(dim=1)).to(torch.int32)
        col = torch.arange(cap, device=device)
        listed = col[None, :] < num_pages[:, None].long()
        not_last = col[None, :] < (num_pages[:, None].long() - 1)
        # Every listed page holds tokens; only the last listed one may be partial.
        bad = (listed & (tok == 0)).any() | (not_last & (tok < page_size)).any()
        bad = bad | (num_pages.long() > cap).any() | (seq_lens < prompt_lens).any()
        zero = torch.zeros((), dtype=torch.int32, device=device)
        stats = torch.stack(
            [
                bad.to(torch.int32),
                lens.max() if batch else zero,
                num_pages.max() if batch else zero,
            ]
        )
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    torch.cumsum(lens, 0, dtype=torch.int32, out=kv_indptr[1:])
    page_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    torch.cumsum(num_pages, 0, dtype=torch.int32, out=page_indptr[1:])
    parts = [kv_indptr, page_indptr, stats]
    if extra_stats is not None:
        parts.append(extra_stats.to(torch.int32).reshape(-1))
    host = torch.cat(parts).cpu()  # the one sync
    kv_indptr_host = host[: batch + 1]
    total_pages = int(host[2 * batch + 1])
    bad_flag, max_len, max_pages = (int(v) for v in host[2 * batch + 2 : 2 * batch + 5])
    extra_host = [int(v) for v in host[2 * batch + 5 :]]
    if validate:
        _expect(
            bad_flag == 0,
            "expected page tables with ids inside each request's decode range, only the "
            "last listed page partial and num_pages <= cap, got a table that breaks this",
        )
    nnz = int(kv_indptr_host[-1])
    if use_triton:
        kv_indices, token_page = fill_lists(
            req_to_token,
            req_rows,
            prompt_lens,
            pages,
            kv_indptr,
            page_indptr,
            nnz,
            max_len,
            page_size,
        )
    else:
        kv_indices, token_page = _fill_torch(
            req_to_token, req_rows, prompt_lens, pages, kv_indptr, page_indptr, lens, nnz,
            page_size,
        )  # fmt: skip
    layout = PageLayout(
        page_size=page_size,
        scored_start=prompt_lens,
        page_indptr=page_indptr,
        num_pages=total_pages,
        max_pages_per_request=max_pages,
    )
    return SparseIndices(
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        token_page=token_page,
        kv_indptr_host=kv_indptr_host,
        layout=layout,
        max_len=max_len,
        extra_host=extra_host,
    )


def _fill_torch(
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prompt_lens: torch.Tensor,
    pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    page_indptr: torch.Tensor,
    lens: torch.Tensor,
    nnz: int,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of `index_kernels.fill_lists` (CPU path and test oracle)."""
    device = pages.device
    batch, cap = pages.shape
    req = torch.repeat_interleave(torch.arange(batch, device=device), lens.long(), output_size=nnz)
    t = torch.arange(nnz, device=device) - kv_indptr.long()[req]
    plen = prompt_lens.long()[req]
    in_prompt = t < plen
    u = (t - plen).clamp(min=0)
    i = torch.div(u, page_size, rounding_mode="floor")
    page = pages.long()[req, i.clamp(max=max(cap - 1, 0))] if cap else torch.zeros_like(u)
    pos = torch.where(in_prompt, t, plen + page * page_size + (u - i * page_size))
    kv_indices = req_to_token[req_rows.long()[req], pos].to(torch.int32)
    token_page = torch.where(in_prompt, torch.full_like(i, -1), page_indptr.long()[req] + i)
    return kv_indices, token_page.to(torch.int32)


def layout_from_token_page(
    kv_indptr: torch.Tensor,
    token_page: torch.Tensor,
    num_pages: int,
    page_size: int,
) -> PageLayout | None:
    """Recognise a page layout in a generic ``token_page`` list, or None.

    kv_indptr: shape [B + 1], integer. token_page: shape [nnz], integer, -1 for unscored.
    The layout holds when, in every request's list, the unscored entries come first and
    the scored ones form consecutive runs of ``page_size`` entries (the last run may be
    shorter) numbered ``0, 1, ...`` from a per-request base, the bases covering
    ``[0, num_pages)`` in request order. Costs one device-to-host copy.
    """
    batch = kv_indptr.numel() - 1
    _expect(batch >= 0, f"expected kv_indptr of at least 1 element, got {kv_indptr.numel()}")
    nnz = token_page.numel()
    device = token_page.device
    indptr = kv_indptr.long()
    lens = indptr[1:] - indptr[:-1]
    req = torch.repeat_interleave(torch.arange(batch, device=device), lens, output_size=nnz)
    t = torch.arange(nnz, device=device) - indptr[req]
    tp = token_page.long()
    scored = tp >= 0
    n_scored = torch.zeros(batch, dtype=torch.int64, device=device).index_add_(
        0, req, scored.long()
    )
    start = lens - n_scored
    counts = torch.div(n_scored + page_size - 1, page_size, rounding_mode="floor")
    page_indptr = _exclusive_cumsum(counts)
    expected = torch.where(
        t >= start[req],
        page_indptr[req] + torch.div(t - start[req], page_size, rounding_mode="floor"),
        torch.full_like(t, -1),
    )
    ok = torch.equal(expected, tp) if nnz else True
    max_pages = int(counts.max()) if batch else 0
    if not ok or int(page_indptr[-1]) != num_pages:
        return None
    return PageLayout(
        page_size=page_size,
        scored_start=start.to(torch.int32),
        page_indptr=page_indptr.to(torch.int32),
        num_pages=num_pages,
        max_pages_per_request=max_pages,
    )
