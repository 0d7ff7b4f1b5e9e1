"""CUDA sparse decode and scoring against the torch reference (needs a CUDA device).

Fresh random inputs per case, float32 reference (`torch_ref`, which upcasts), bf16
tolerances: output ||out - ref|| / ||ref|| < 1e-2; page mass < 1e-4 where it is computed
in float32 from the same bf16 operands (fused Triton kernel, FlashInfer's CUDA-core LSE)
and < 2e-3 from FlashInfer's tensor-core LSE, which is accurate to about 1e-3 (log2
units) only. Outputs are poisoned with NaN before each run to
catch unwritten entries. Each case prints a ``CHECK`` line (collected in
docs/benchmarks.md); run with ``pytest -s`` to see them.
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch

from raas_backend.kernels import torch_ref
from raas_backend.kernels.cuda.indexing import build_sparse_indices
from raas_backend.paging import PageTable

PAGE = 16
HAS_CUDA = torch.cuda.is_available()
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and Triton (GPU-only kernels)"
)
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer not installed")

HEADS = [(32, 8, 128), (28, 4, 128), (9, 3, 64)]
BATCHES = [1, 8, 32]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def random_batch(batch: int, hq: int, hkv: int, dim: int, seed: int, max_decode: int = 1500):
    """Ragged requests with random prompts, lengths and evicted pages, SGLang-like slots."""
    rng = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tables = []
    for _ in range(batch):
        prompt = rng.choice([0, 1, 17, 100, 300])
        decode = rng.randint(1, max_decode)
        n = -(-decode // PAGE)
        keep = [p for p in range(n - 1) if rng.random() < 0.6] + [n - 1]
        tables.append(
            PageTable(prompt_len=prompt, page_size=PAGE, seq_len=prompt + decode, retained=keep)
        )
    max_ctx = max(t.seq_len for t in tables)
    slots = batch * max_ctx
    req_to_token = torch.randperm(slots, device="cuda", generator=gen).view(batch, max_ctx)
    req_to_token = req_to_token.to(torch.int32)
    cap = max(len(t.retained) for t in tables)
    pages = torch.full((batch, cap), -1, dtype=torch.int32)
    for b, t in enumerate(tables):
        pages[b, : len(t.retained)] = torch.tensor(t.retained, dtype=torch.int32)
    idx = build_sparse_indices(
        req_to_token,
        torch.arange(batch, device="cuda"),
        torch.tensor([t.prompt_len for t in tables], dtype=torch.int32, device="cuda"),
        torch.tensor([t.seq_len for t in tables], dtype=torch.int32, device="cuda"),
        pages.cuda(),
        torch.tensor([len(t.retained) for t in tables], dtype=torch.int32, device="cuda"),
        PAGE,
    )
    k = torch.randn(slots, hkv, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(slots, hkv, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    scale = rng.choice([1.0, 3.0])
    q = (scale * torch.randn(batch, hq, dim, device="cuda", generator=gen)).to(torch.bfloat16)
    return idx, q, k, v, req_to_token, tables


def backends(hq: int, hkv: int) -> list[tuple[str, bool | None]]:
    out: list[tuple[str, bool | None]] = [("triton", None), ("triton-dot", None), ("auto", None)]
    if HAS_FLASHINFER:
        out.append(("flashinfer", True))
        if hq // hkv in (1, 2, 3, 4, 6, 8, 16):
            out.append(("flashinfer", False))
    return out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("hq", "hkv", "dim"), HEADS)
def test_sparse_decode_matches_reference(batch: int, hq: int, hkv: int, dim: int) -> None:
    from raas_backend.kernels.cuda.decode import SparseDecoder

    seed = hash((batch, hq, hkv, dim)) % 10_000
    idx, q, k, v, _, _ = random_batch(batch, hq, hkv, dim, seed)
    sm = 1 / math.sqrt(dim)
    n = idx.layout.num_pages
    ref_out, ref_mass = torch_ref.sparse_decode(
        q, k, v, idx.kv_indptr.long(), idx.kv_indices.long(), sm, idx.token_page.long(), n
    )
    assert ref_mass is not None
    from raas_backend.kernels.cuda.triton_decode import TritonDecodeConfig

    for name, tc in backends(hq, hkv):
        engine = "triton" if name.startswith("triton") else name
        dec = SparseDecoder(
            hq,
            hkv,
            dim,
            backend=engine,  # type: ignore[arg-type]
            use_tensor_cores=tc,
            triton_config=None if name == "auto" else TritonDecodeConfig(page_dot=name != "triton"),
        )
        dec.plan_indices(idx, sm_scale=sm)
        mass_out = torch.full((n, hq), float("nan"), device="cuda")
        acc = torch.zeros(n, device="cuda")
        out, mass = dec.run(q, k, v, head_max_into=acc, page_mass_out=mass_out)
        torch.cuda.synchronize()
        assert mass is not None
        e_out, e_mass = rel(out, ref_out), rel(mass, ref_mass)
        e_acc = float((acc - ref_mass.amax(1)).abs().max())
        path = f"{name}{'-tc' if tc else '-cc' if tc is False else ''}"
        print(
            f"CHECK heads={hq}/{hkv}/{dim} B={batch} nnz={idx.kv_indices.numel()} "
            f"pages={n} {path}: out_rel={e_out:.2e} mass_rel={e_mass:.2e} acc_abs={e_acc:.1e}"
        )
        assert torch.isfinite(out).all() and torch.isfinite(mass).all()
        loose = path in ("flashinfer-tc", "triton-dot", "auto")
        assert e_out < 1e-2, (path, e_out)
        assert e_mass < (2e-3 if loose else 1e-4), (path, e_mass)
        assert e_acc < (2e-3 if loose else 1e-4), (path, e_acc)


@needs_flashinfer
@pytest.mark.parametrize(("hq", "hkv", "dim"), HEADS)
def test_flashinfer_lse_is_base2(hq: int, hkv: int, dim: int) -> None:
    from raas_backend.kernels.cuda.flashinfer_decode import FlashInferDecode
    from raas_backend.kernels.cuda.triton_decode import fused_sparse_decode

    idx, q, k, v, _, _ = random_batch(8, hq, hkv, dim, 5)
    sm = 1 / math.sqrt(dim)
    fi = FlashInferDecode(hq, hkv, dim, torch.bfloat16, torch.device("cuda"))
    fi.plan(idx.kv_indptr_host, idx.kv_indices, sm)
    _, lse = fi.run(q, k, v, return_lse=True)
    _, lse_t, _ = fused_sparse_decode(
        q, k, v, idx.kv_indptr, idx.kv_indices, idx.layout, sm, idx.max_len, score=False
    )
    ip = idx.kv_indptr.tolist()
    ref = []
    for b in range(8):
        kk = k[idx.kv_indices[ip[b] : ip[b + 1]].long()].float()
        qq = q[b].float().view(hkv, hq // hkv, dim)
        s = torch.einsum("hgd,nhd->hgn", qq, kk).reshape(hq, -1) * sm
        ref.append(torch.logsumexp(s, -1) / math.log(2))
    want = torch.stack(ref)
    assert lse is not None
    e_fi, e_tr = float((lse - want).abs().max()), float((lse_t - want).abs().max())
    print(f"CHECK lse heads={hq}/{hkv}/{dim}: flashinfer-tc={e_fi:.1e} triton={e_tr:.1e}")
    assert e_fi < 5e-3 and e_tr < 1e-4


@pytest.mark.parametrize("backend", ["flashinfer", "triton", "auto"])
def test_one_shot_function_keeps_the_reference_contract(backend: str) -> None:
    from raas_backend.kernels.cuda.decode import sparse_decode

    if backend == "flashinfer" and not HAS_FLASHINFER:
        pytest.skip("flashinfer not installed")
    idx, q, k, v, _, _ = random_batch(8, 28, 4, 128, 9)
    sm = 1 / math.sqrt(128)
    n = idx.layout.num_pages
    args = (q, k, v, idx.kv_indptr.long(), idx.kv_indices.long(), sm)
    ref_out, ref_mass = torch_ref.sparse_decode(*args, idx.token_page.long(), n)
    out, mass = sparse_decode(*args, idx.token_page.long(), n, backend=backend)  # type: ignore[arg-type]
    assert mass is not None and ref_mass is not None
    assert rel(out, ref_out) < 1e-2 and rel(mass, ref_mass) < 2e-3
    # A page numbering the fast kernels do not know: the generic fallback must agree.
    perm = torch.randperm(n, device="cuda")
    tp = idx.token_page.long()
    shuffled = torch.where(tp >= 0, perm[tp.clamp(min=0)], tp)
    ref_out2, ref_mass2 = torch_ref.sparse_decode(*args, shuffled, n)
    out2, mass2 = sparse_decode(*args, shuffled, n, backend=backend)  # type: ignore[arg-type]
    assert mass2 is not None and ref_mass2 is not None
    assert rel(out2, ref_out2) < 1e-2 and rel(mass2, ref_mass2) < 2e-3
    out3, none = sparse_decode(*args, backend=backend)  # type: ignore[arg-type]
    assert none is None and rel(out3, ref_out) < 1e-2


@pytest.mark.parametrize(("hq", "hkv", "dim"), HEADS)
def test_quest_selection_and_attention(hq: int, hkv: int, dim: int) -> None:
    from raas_backend.kernels.cuda.decode import SparseDecoder
    from raas_backend.kernels.cuda.quest import build_page_bounds, plan_quest, quest_select

    batch = 8
    rng = random.Random(hq)
    gen = torch.Generator(device="cuda").manual_seed(hq)
    prompts = torch.tensor([rng.choice([0, 5, 40]) for _ in range(batch)], dtype=torch.int32)
    seqs = prompts + torch.tensor([rng.randint(1, 3000) for _ in range(batch)], dtype=torch.int32)
    max_ctx = int(seqs.max())
    req_to_token = torch.randperm(batch * max_ctx, device="cuda", generator=gen)
    req_to_token = req_to_token.view(batch, max_ctx).to(torch.int32)
    k = torch.randn(batch * max_ctx, hkv, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    rows = torch.arange(batch, device="cuda")
    prompts, seqs = prompts.cuda(), seqs.cuda()
    sm = 1 / math.sqrt(dim)
    plan = plan_quest(req_to_token, rows, prompts, seqs, PAGE, budget_pages=32)
    kmin, kmax = build_page_bounds(k, req_to_token, rows, prompts, seqs, PAGE, max_ctx // PAGE + 1)
    scores = quest_select(q, kmin, kmax, plan, sm, req_to_token)
    ip = plan.kv_indptr.tolist()
    worst = 0.0
    for b in range(batch):
        nc, ns, pl = int(plan.n_cand[b]), int(plan.n_sel[b]), int(prompts[b])
        if nc == 0:
            continue
        slots = req_to_token[b, pl + torch.arange(nc * PAGE, device="cuda")].long()
        kmn, kmx = torch_ref.page_key_bounds(
            k[slots], torch.arange(nc, device="cuda").repeat_interleave(PAGE), nc
        )
        ref = torch_ref.quest_bounds(q[b], kmn, kmx, sm).amax(1)
        worst = max(worst, rel(scores[b, :nc], ref))
        chosen = plan.kv_indices[ip[b] + pl : ip[b] + pl + ns * PAGE].view(ns, PAGE)
        inv = torch.empty(batch * max_ctx, dtype=torch.int64, device="cuda")
        inv[req_to_token[b].long()] = torch.arange(max_ctx, device="cuda")
        got_pages = (inv[chosen[:, 0].long()] - pl) // PAGE
        # The chosen pages' reference bounds are the top-ns reference bounds (ties aside).
        top = torch.topk(ref, ns).values
        assert torch.allclose(ref[got_pages].sort().values, top.sort().values, rtol=1e-2, atol=1e-2)
    print(f"CHECK quest heads={hq}/{hkv}/{dim} B={batch}: bound_rel={worst:.2e}")
    assert worst < 1e-2
    for name in ("flashinfer", "triton"):
        if name == "flashinfer" and not HAS_FLASHINFER:
            continue
        dec = SparseDecoder(hq, hkv, dim, backend=name)  # type: ignore[arg-type]
        dec.plan(plan.kv_indptr, plan.kv_indices, sm_scale=sm, kv_indptr_host=plan.kv_indptr_host)
        out, _ = dec.run(q, k, v, score=False)
        ref_out, _ = torch_ref.sparse_decode(
            q, k, v, plan.kv_indptr.long(), plan.kv_indices.long(), sm
        )
        print(
            f"CHECK quest-attention heads={hq}/{hkv}/{dim} {name}: out_rel={rel(out, ref_out):.2e}"
        )
        assert rel(out, ref_out) < 1e-2
