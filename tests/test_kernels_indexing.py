"""CSR index building for the CUDA decode path, checked against `PageTable` on the CPU.

The builders are plain torch; the same code runs on the GPU in the decode step. The
request rows mimic SGLang's layout: ``req_to_token[row, position]`` -> slot, slots
handed out from a shuffled free list (so neither contiguous nor aligned to pages).
"""

from __future__ import annotations

import random

import pytest
import torch

from raas_backend.kernels.cuda.indexing import (
    build_sparse_indices,
    layout_from_token_page,
    page_tokens,
)
from raas_backend.paging import PageTable

PAGE = 16


def random_tables(rng: random.Random, batch: int) -> list[PageTable]:
    tables = []
    for _ in range(batch):
        table = PageTable(prompt_len=rng.choice([0, 1, 7, 16, 33]), page_size=PAGE)
        for _ in range(rng.randint(1, 120)):
            table.append_token()
        others = [p for p in table.retained if p != table.tail_page]
        drop = [p for p in others if rng.random() < 0.4]
        if drop:
            table.evict(drop)
        tables.append(table)
    return tables


def batch_tensors(tables: list[PageTable], rows: list[int], cap: int, device: str = "cpu"):
    batch = len(tables)
    pages = torch.full((batch, cap), -1, dtype=torch.int32)
    for b, t in enumerate(tables):
        pages[b, : len(t.retained)] = torch.tensor(t.retained, dtype=torch.int32)
    return dict(
        req_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        prompt_lens=torch.tensor([t.prompt_len for t in tables], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([t.seq_len for t in tables], dtype=torch.int32, device=device),
        pages=pages.to(device),
        num_pages=torch.tensor([len(t.retained) for t in tables], dtype=torch.int32, device=device),
    )


def slot_table(num_rows: int, max_context: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows * max_context, generator=g).view(num_rows, max_context)


@pytest.mark.parametrize("seed", range(6))
def test_lists_match_page_tables(seed: int) -> None:
    rng = random.Random(seed)
    batch = rng.choice([1, 3, 8])
    tables = random_tables(rng, batch)
    rows = rng.sample(range(12), batch)
    req_to_token = slot_table(12, 200, seed).to(torch.int32)
    idx = build_sparse_indices(req_to_token, **batch_tensors(tables, rows, cap=10), page_size=PAGE)
    indptr = idx.kv_indptr.tolist()
    assert idx.kv_indptr.dtype == idx.kv_indices.dtype == idx.token_page.dtype == torch.int32
    assert idx.kv_indptr_host.tolist() == indptr
    base = 0
    for b, t in enumerate(tables):
        got = idx.kv_indices[indptr[b] : indptr[b + 1]].long()
        want = req_to_token[rows[b], t.retained_positions()].long()
        assert torch.equal(got, want)
        pages = idx.token_page[indptr[b] : indptr[b + 1]].long()
        ref = t.token_pages()
        assert torch.equal(pages, torch.where(ref >= 0, ref + base, ref))
        base += len(t.retained)
    assert idx.layout.num_pages == base
    assert idx.max_len == max(t.retained_tokens for t in tables)
    assert idx.layout.max_pages_per_request == max(len(t.retained) for t in tables)
    assert idx.layout.scored_start.tolist() == [t.prompt_len for t in tables]
    owners = idx.layout.page_request().tolist()
    assert owners == [b for b, t in enumerate(tables) for _ in t.retained]


def test_quest_style_subset_is_accepted() -> None:
    """Any ascending subset that keeps the tail last is a valid list (quest, h2o...)."""
    table = PageTable(prompt_len=5, page_size=PAGE)
    for _ in range(100):
        table.append_token()
    subset = [1, 4, table.tail_page]
    req_to_token = slot_table(2, 128, 0)
    t = batch_tensors([table], [1], cap=8)
    t["pages"][0, :] = -1
    t["pages"][0, :3] = torch.tensor(subset, dtype=torch.int32)
    t["num_pages"][0] = 3
    idx = build_sparse_indices(req_to_token, **t, page_size=PAGE)
    assert torch.equal(
        idx.kv_indices.long(), req_to_token[1, table.retained_positions(subset)].long()
    )
    assert torch.equal(idx.token_page.long(), table.token_pages(subset))


@pytest.mark.parametrize(
    ("pages", "num", "message"),
    [
        ([0, 7], 2, "ids inside"),  # page 7 holds no token yet
        ([6, 0], 2, "ids inside"),  # the partial tail is not last
    ],
)
def test_invalid_tables_are_rejected(pages: list[int], num: int, message: str) -> None:
    table = PageTable(prompt_len=3, page_size=PAGE)
    for _ in range(100):
        table.append_token()
    t = batch_tensors([table], [0], cap=8)
    t["pages"][0, :] = -1
    t["pages"][0, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    t["num_pages"][0] = num
    with pytest.raises(ValueError, match=message):
        build_sparse_indices(slot_table(1, 128, 0), **t, page_size=PAGE)


def test_shape_errors_name_what_was_expected() -> None:
    t = batch_tensors([PageTable(prompt_len=1, page_size=PAGE, seq_len=2)], [0], cap=2)
    t["seq_lens"] = torch.tensor([2, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="expected seq_lens of 1 elements, got 2"):
        build_sparse_indices(slot_table(1, 8, 0), **t, page_size=PAGE)


def test_page_tokens_counts_partial_tail() -> None:
    pages = torch.tensor([[0, 1, 2, -1]], dtype=torch.int32)
    tok = page_tokens(
        pages,
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([4], dtype=torch.int32),
        torch.tensor([4 + 37], dtype=torch.int32),
        PAGE,
    )
    assert tok.tolist() == [[16, 16, 5, 0]]


@pytest.mark.parametrize("seed", range(3))
def test_layout_recognised_from_token_page(seed: int) -> None:
    rng = random.Random(100 + seed)
    tables = random_tables(rng, 4)
    idx = build_sparse_indices(
        slot_table(4, 200, seed), **batch_tensors(tables, [0, 1, 2, 3], cap=10), page_size=PAGE
    )
    layout = layout_from_token_page(idx.kv_indptr, idx.token_page, idx.layout.num_pages, PAGE)
    assert layout is not None
    assert torch.equal(layout.scored_start, idx.layout.scored_start)
    assert torch.equal(layout.page_indptr, idx.layout.page_indptr)
    # Shuffle the page numbering: a valid token_page for the reference, not this layout.
    perm = torch.randperm(idx.layout.num_pages)
    tp = idx.token_page.long()
    shuffled = torch.where(tp >= 0, perm[tp.clamp(min=0)], tp)
    if idx.layout.num_pages > 1 and not torch.equal(perm, torch.arange(idx.layout.num_pages)):
        assert layout_from_token_page(idx.kv_indptr, shuffled, idx.layout.num_pages, PAGE) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lists_on_cuda_match_cpu() -> None:
    rng = random.Random(7)
    tables = random_tables(rng, 8)
    rows = list(range(8))
    req_to_token = slot_table(8, 200, 1).to(torch.int32)
    cpu = build_sparse_indices(req_to_token, **batch_tensors(tables, rows, 10), page_size=PAGE)
    gpu = build_sparse_indices(
        req_to_token.cuda(), **batch_tensors(tables, rows, 10, "cuda"), page_size=PAGE
    )
    assert torch.equal(cpu.kv_indices, gpu.kv_indices.cpu())
    assert torch.equal(cpu.token_page, gpu.token_page.cpu())
