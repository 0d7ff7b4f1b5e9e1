"""The Triton kernels, run by Triton's CPU interpreter on tiny shapes (no GPU needed).

The interpreter is switched on per process (``TRITON_INTERPRET=1`` is read when the
kernels are decorated), so the checks run in a subprocess: this file is also a script.
The interpreter has no bfloat16 arithmetic, so these use float16; the bf16 runs happen
on the GPU (tests/test_kernels_cuda.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

PAGE = 16


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _case(seed: int):
    import torch

    from raas_backend.kernels.cuda.indexing import build_sparse_indices

    g = torch.Generator().manual_seed(seed)
    batch, hq, hkv, dim = 3, 6, 2, 64
    prompts = torch.tensor([5, 0, 20], dtype=torch.int32)
    seqs = prompts + torch.tensor([40, 33, 70], dtype=torch.int32)
    rows = torch.tensor([2, 0, 3])
    req_to_token = torch.randperm(4 * 128, generator=g).view(4, 128).to(torch.int32)
    pages = torch.full((batch, 6), -1, dtype=torch.int32)
    pages[0, :2] = torch.tensor([0, 2])
    pages[1, :3] = torch.tensor([0, 1, 2])
    pages[2, :3] = torch.tensor([1, 3, 4])
    num = torch.tensor([2, 3, 3], dtype=torch.int32)
    idx = build_sparse_indices(req_to_token, rows, prompts, seqs, pages, num, PAGE)
    dt = torch.float16
    k = torch.randn(512, hkv, dim, generator=g).to(dt)
    v = torch.randn(512, hkv, dim, generator=g).to(dt)
    q = (2 * torch.randn(batch, hq, dim, generator=g)).to(dt)
    return idx, q, k, v, 1 / math.sqrt(dim)


def _ref_lse(idx, q, k, sm_scale):
    import torch

    hq, dim = q.shape[1:]
    hkv = k.shape[1]
    ip = idx.kv_indptr.tolist()
    out = []
    for b in range(q.shape[0]):
        kk = k[idx.kv_indices[ip[b] : ip[b + 1]].long()].float()
        qq = q[b].float().view(hkv, hq // hkv, dim)
        s = torch.einsum("hgd,nhd->hgn", qq, kk).reshape(hq, -1) * sm_scale
        out.append(torch.logsumexp(s, -1) / math.log(2))
    return torch.stack(out)


def main() -> None:
    import torch

    from raas_backend.kernels import torch_ref
    from raas_backend.kernels.cuda.page_mass import page_mass_from_lse
    from raas_backend.kernels.cuda.quest import build_page_bounds, plan_quest, quest_select
    from raas_backend.kernels.cuda.triton_decode import TritonDecodeConfig, fused_sparse_decode

    idx, q, k, v, sm = _case(0)
    n = idx.layout.num_pages
    ref_out, ref_mass = torch_ref.sparse_decode(
        q, k, v, idx.kv_indptr.long(), idx.kv_indices.long(), sm, idx.token_page.long(), n
    )
    lse = _ref_lse(idx, q, k, sm)
    poisoned = torch.full((n, q.shape[1]), float("nan"))
    acc = torch.zeros(n)
    mass = page_mass_from_lse(
        q, k, idx.kv_indptr, idx.kv_indices, lse, idx.layout, sm, out=poisoned, head_max_into=acc
    )
    assert torch.isfinite(mass).all(), "page mass left unwritten entries"
    assert _rel(mass, ref_mass) < 1e-5, _rel(mass, ref_mass)
    assert torch.allclose(acc, ref_mass.amax(1), atol=1e-6)
    for block_t, programs, page_dot in ((16, 6, False), (32, 100, False), (64, 6, True)):
        acc = torch.zeros(n)
        cfg = TritonDecodeConfig(block_t=block_t, target_programs=programs, page_dot=page_dot)
        tol = 2e-3 if page_dot else 1e-5
        out, lse2, mass2 = fused_sparse_decode(
            q, k, v, idx.kv_indptr, idx.kv_indices, idx.layout, sm, idx.max_len,
            head_max_into=acc, config=cfg,
        )  # fmt: skip
        assert _rel(out, ref_out) < 2e-3, _rel(out, ref_out)
        assert (lse2 - lse).abs().max() < 1e-4
        assert mass2 is not None and _rel(mass2, ref_mass) < tol, _rel(mass2, ref_mass)
        assert torch.allclose(acc, ref_mass.amax(1), atol=tol)

    # Quest: scores, selection and lists.
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([2, 0, 3])
    prompts = torch.tensor([5, 0, 20], dtype=torch.int32)
    seqs = prompts + torch.tensor([40, 33, 170], dtype=torch.int32)
    req_to_token = torch.randperm(4 * 256, generator=g).view(4, 256).to(torch.int32)
    k = torch.randn(1024, 2, 64, generator=g).to(torch.float16)
    plan = plan_quest(req_to_token, rows, prompts, seqs, PAGE, 4)
    kmin, kmax = build_page_bounds(k, req_to_token, rows, prompts, seqs, PAGE, 16)
    scores = quest_select(q, kmin, kmax, plan, sm, req_to_token)
    ip = plan.kv_indptr.tolist()
    for b in range(3):
        nc, ns, pl = int(plan.n_cand[b]), int(plan.n_sel[b]), int(prompts[b])
        slots = req_to_token[rows[b], pl + torch.arange(nc * PAGE)].long()
        kmn, kmx = torch_ref.page_key_bounds(k[slots], torch.arange(nc).repeat_interleave(PAGE), nc)
        ref = torch_ref.quest_bounds(q[b], kmn, kmx, sm).amax(1)
        assert (scores[b, :nc] - ref).abs().max() < 1e-3
        assert torch.isinf(scores[b, nc:]).all()
        top = torch.topk(ref, ns).indices
        want = req_to_token[rows[b], (pl + top[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)]
        lst = plan.kv_indices[ip[b] : ip[b + 1]]
        assert set(lst[pl : pl + ns * PAGE].tolist()) == set(want.tolist())
        assert lst[:pl].tolist() == req_to_token[rows[b], :pl].tolist()
        tail = req_to_token[rows[b], pl + nc * PAGE : int(seqs[b])]
        assert lst[pl + ns * PAGE :].tolist() == tail.tolist()
    # Index building: the two Triton kernels against the torch path.
    from raas_backend.kernels.cuda.indexing import build_sparse_indices

    g = torch.Generator().manual_seed(2)
    req_to_token = torch.randperm(4 * 128, generator=g).view(4, 128).to(torch.int32)
    prompts = torch.tensor([5, 0, 20], dtype=torch.int32)
    seqs = prompts + torch.tensor([40, 33, 70], dtype=torch.int32)
    pages = torch.full((3, 6), -1, dtype=torch.int32)
    pages[0, :2] = torch.tensor([0, 2])
    pages[1, :3] = torch.tensor([0, 1, 2])
    pages[2, :3] = torch.tensor([1, 3, 4])
    num = torch.tensor([2, 3, 3], dtype=torch.int32)
    args = (req_to_token, torch.tensor([2, 0, 3]), prompts, seqs, pages, num, PAGE)
    a = build_sparse_indices(*args, use_triton=True)
    b = build_sparse_indices(*args, use_triton=False)
    assert torch.equal(a.kv_indptr, b.kv_indptr) and torch.equal(a.kv_indices, b.kv_indices)
    assert torch.equal(a.token_page, b.token_page) and a.max_len == b.max_len
    pages_bad = pages.clone()
    pages_bad[1, :3] = torch.tensor([0, 2, 1])  # the partial tail not last
    try:
        build_sparse_indices(
            req_to_token,
            torch.tensor([2, 0, 3]),
            prompts,
            seqs,
            pages_bad,
            num,
            PAGE,
            use_triton=True,
        )  # noqa: E501
    except ValueError:
        pass
    else:
        raise AssertionError("the Triton lengths kernel missed a bad table")

    # Quest bounds update: the Triton kernel against torch indexing.
    from raas_backend.kernels.cuda.quest import update_page_bounds

    kmin2, kmax2 = kmin.clone(), kmax.clone()
    kmin3, kmax3 = kmin.clone(), kmax.clone()
    rows = torch.tensor([2, 0, 3])
    prompts = torch.tensor([5, 0, 20], dtype=torch.int32)
    for extra in (1, 2):  # position 40 opens a page (first), then 41 folds into it
        seqs2 = prompts + torch.tensor([40, 33, 170], dtype=torch.int32) + extra
        k_new = torch.randn(3, 2, 64, generator=g).to(torch.float16)
        update_page_bounds(kmin2, kmax2, k_new, rows, prompts, seqs2, PAGE, use_triton=True)
        update_page_bounds(kmin3, kmax3, k_new, rows, prompts, seqs2, PAGE, use_triton=False)
        assert torch.equal(kmin2, kmin3) and torch.equal(kmax2, kmax3)

    # Batched RaaS bookkeeping: the fused kernel against the per-request policy.
    from tests.test_kernels_batched_policy import run_both

    run_both(3, "cpu", alpha=0.3, refresh=0.0, steps=70, fused=True)
    run_both(11, "cpu", alpha=0.9, refresh=0.25, steps=70, fused=True)
    run_both(12, "cpu", alpha=0.9, refresh=0.5, steps=70, fused=True, zero_fraction=0.7)
    print("triton interpreter checks passed")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checks passed" in res.stdout


if __name__ == "__main__":
    main()
