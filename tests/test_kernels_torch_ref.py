"""The torch reference kernels against an independent float64 dense softmax.

`sparse_decode` attends each request over its listed slots only; the oracle attends
over the request's whole row with the non-listed positions masked to -inf, so the two
agree exactly when the gather, the GQA head mapping and the page scoring are right.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.kernels.torch_ref import (
    attend_one,
    page_key_bounds,
    page_mass,
    quest_bounds,
    sparse_decode,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and leaves the shared cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LAYOUTS = [(9, 3, 64), (32, 8, 128), (4, 4, 16), (8, 1, 32)]  # (num_qo_heads, num_kv_heads, D)


def _dense_oracle(q, k, v, keep, scale):
    """float64 softmax over all n positions with ~keep masked out.

    q: [Hq, D]; k, v: [n, Hkv, D]; keep: [n] bool. Returns (out [Hq, D], probs [Hq, n]).
    """
    hq, d = q.shape
    kv_head = torch.arange(hq) // (hq // k.shape[1])  # consecutive query heads share one
    k64 = k.double()[:, kv_head, :].transpose(0, 1)  # [Hq, n, D]
    v64 = v.double()[:, kv_head, :].transpose(0, 1)
    logits = (k64 @ q.double().unsqueeze(-1)).squeeze(-1) * scale  # [Hq, n]
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return (probs.unsqueeze(1) @ v64).squeeze(1), probs


def _retention(gen, n, prompt_len, page_size):
    """A row of n positions: which are listed (the prompt, the tail page and a random
    subset of the other decode pages), each position's decode page (-1: prompt), and
    which decode pages are kept."""
    decode_page = torch.full((n,), -1, dtype=torch.int64)
    if n > prompt_len:
        decode_page[prompt_len:] = torch.arange(n - prompt_len) // page_size
    num_pages = int(decode_page.max()) + 1 if n > prompt_len else 0
    keep_page = torch.rand(num_pages, generator=gen) < 0.6
    if num_pages:
        keep_page[-1] = True
    keep = torch.ones(n, dtype=torch.bool)
    if num_pages:
        keep[prompt_len:] = keep_page[decode_page[prompt_len:]]
    return keep, decode_page, keep_page


@pytest.mark.parametrize(("hq", "hkv", "d"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.integers(1, 48), min_size=1, max_size=4),
    page_size=st.integers(1, 8),
    logit_scale=st.sampled_from([0.1, 1.0, 4.0]),
)
def test_sparse_decode_matches_masked_dense_softmax(
    hq, hkv, d, dtype, seed, lengths, page_size, logit_scale
):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    num_slots = sum(lengths) + 7  # spare slots hold garbage nobody may read
    k_buffer = (torch.randn(num_slots, hkv, d, generator=gen) * logit_scale).to(dtype)
    v_buffer = torch.randn(num_slots, hkv, d, generator=gen).to(dtype)
    q = torch.randn(batch, hq, d, generator=gen).to(dtype)
    scale = d**-0.5
    perm = torch.randperm(num_slots, generator=gen)

    indptr, indices, token_page, oracles = [0], [], [], []
    page_offset = 0
    used = 0
    for b, n in enumerate(lengths):
        prompt_len = int(torch.randint(0, n + 1, (1,), generator=gen))
        slots = perm[used : used + n]
        used += n
        keep, decode_page, keep_page = _retention(gen, n, prompt_len, page_size)
        # Global ids of the scored pages (the retained decode pages) of this request.
        kept_ids = torch.nonzero(keep_page).flatten()
        global_id = torch.full((len(keep_page),), -1, dtype=torch.int64)
        global_id[kept_ids] = torch.arange(len(kept_ids)) + page_offset
        tp = decode_page.clone()
        tp[decode_page >= 0] = global_id[decode_page[decode_page >= 0]]
        listed = torch.nonzero(keep).flatten()
        indices.append(slots[listed])
        token_page.append(tp[listed])
        indptr.append(indptr[-1] + len(listed))
        out, probs = _dense_oracle(q[b], k_buffer[slots], v_buffer[slots], keep, scale)
        oracles.append((out, probs, tp, keep, page_offset, len(kept_ids)))
        page_offset += len(kept_ids)

    out, page_mass = sparse_decode(
        q,
        k_buffer,
        v_buffer,
        torch.tensor(indptr, dtype=torch.int64),
        torch.cat(indices).to(torch.int64),
        scale,
        torch.cat(token_page),
        page_offset,
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert page_mass.dtype == torch.float32 and page_mass.shape == (page_offset, hq)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for b, (want, probs, tp, keep, off, n_pages) in enumerate(oracles):
        torch.testing.assert_close(out[b].double(), want, atol=atol, rtol=atol)
        mass = page_mass[off : off + n_pages].double()
        # Oracle page mass: probabilities times the token -> page membership matrix.
        member = (tp.unsqueeze(1) == torch.arange(off, off + n_pages)).double()  # [n, pages]
        torch.testing.assert_close(mass, (probs @ member).T, atol=1e-5, rtol=1e-5)
        # The scored pages carry all the mass the prompt does not.
        prompt_mass = probs[:, (tp == -1) & keep].sum(dim=1)
        torch.testing.assert_close(mass.sum(dim=0), 1.0 - prompt_mass, atol=1e-5, rtol=1e-5)
        # Masked positions got no probability in the oracle (sanity of the oracle).
        assert float(probs[:, ~keep].abs().sum()) == 0.0


def test_sparse_decode_without_token_page_returns_no_mass():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 64, generator=gen)
    k = torch.randn(10, 3, 64, generator=gen)
    v = torch.randn(10, 3, 64, generator=gen)
    indptr = torch.tensor([0, 4, 10])
    indices = torch.tensor([9, 1, 3, 5, 0, 2, 4, 6, 7, 8])
    out, mass = sparse_decode(q, k, v, indptr, indices, 0.125)
    assert mass is None
    for b in range(2):
        idx = indices[indptr[b] : indptr[b + 1]]
        want, _ = _dense_oracle(q[b], k[idx], v[idx], torch.ones(len(idx), dtype=torch.bool), 0.125)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


@given(
    n=st.integers(1, 80),
    num_pages=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_page_mass_sums_each_pages_probabilities(n, num_pages, seed):
    """The one page-mass reduction the reference and the engine share: per page and
    head, the sum of its tokens' probabilities; unscored tokens (-1) count nowhere."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(5, n, generator=gen)
    token_page = torch.randint(-1, num_pages, (n,), generator=gen)
    mass = page_mass(probs, token_page, num_pages)
    assert mass.shape == (num_pages, 5)
    for p in range(num_pages):
        want = probs[:, token_page == p].double().sum(dim=1)
        torch.testing.assert_close(mass[p].double(), want, atol=1e-6, rtol=1e-6)


def test_sparse_decode_rejects_a_bad_indptr():
    q = torch.zeros(2, 4, 8)
    k = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="kv_indptr"):
        sparse_decode(q, k, k, torch.tensor([0, 4]), torch.arange(4), 1.0)


def test_attend_one_checks_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        attend_one(torch.zeros(4, 8), torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), 1.0)
    with pytest.raises(ValueError, match="divisible"):
        attend_one(torch.zeros(9, 8), torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), 1.0)


@pytest.mark.parametrize(("hq", "hkv", "d"), LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 64),
    num_pages=st.integers(1, 8),
    key_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_quest_bound_upper_bounds_every_token(hq, hkv, d, seed, n, num_pages, key_scale, sign):
    gen = torch.Generator().manual_seed(seed)
    num_pages = min(num_pages, n)
    # Every page gets at least one token; pages need not be contiguous.
    token_page = torch.cat(
        [torch.arange(num_pages), torch.randint(0, num_pages, (n - num_pages,), generator=gen)]
    )
    token_page = token_page[torch.randperm(n, generator=gen)]
    k = torch.randn(n, hkv, d, generator=gen) * key_scale + sign * key_scale
    q = torch.randn(hq, d, generator=gen)
    scale = d**-0.5

    kmin, kmax = page_key_bounds(k, token_page, num_pages)
    assert kmin.shape == kmax.shape == (num_pages, hkv, d)
    for p in range(num_pages):
        members = k[token_page == p]
        torch.testing.assert_close(kmin[p], members.amin(dim=0), rtol=0, atol=0)
        torch.testing.assert_close(kmax[p], members.amax(dim=0), rtol=0, atol=0)

    bound = quest_bounds(q, kmin, kmax, scale)
    assert bound.shape == (num_pages, hq) and bound.dtype == torch.float32
    group = hq // hkv
    kv_head = torch.arange(hq) // group
    # Exact q.k of every token against every query head, in float64.
    dots = torch.einsum("hd,nhd->nh", q.double(), k.double()[:, kv_head, :]) * scale
    mags = torch.einsum("hd,nhd->nh", q.double().abs(), k.double().abs()[:, kv_head, :]) * scale
    slack = 1e-5 * mags + 1e-6  # float32 rounding of the bound's own sum
    per_token_bound = bound.double()[token_page]  # [n, hq]
    assert bool((per_token_bound >= dots - slack).all())
    # The bound is the exact one: a single-token page is bounded by its own q.k.
    for p in range(num_pages):
        if int((token_page == p).sum()) == 1:
            t = int(torch.nonzero(token_page == p))
            torch.testing.assert_close(bound[p].double(), dots[t], atol=1e-4, rtol=1e-4)


def test_quest_bound_matches_the_formula():
    q = torch.tensor([[1.0, -2.0, 0.0]])
    kmin = torch.tensor([[[-1.0, -1.0, -5.0]]])
    kmax = torch.tensor([[[3.0, 4.0, 5.0]]])
    # max(1*-1, 1*3) + max(-2*-1, -2*4) + max(0, 0) = 3 + 2 + 0
    assert quest_bounds(q, kmin, kmax, 0.5).tolist() == [[2.5]]
