"""The CUDA sparse-page decode adapter: plan once per batch, run per layer.

`SparseDecoder` is what an attention backend holds; `sparse_decode` is the one-shot
form with exactly the contract of `raas_backend.kernels.torch_ref.sparse_decode`.
See the package docstring (`raas_backend.kernels.cuda`) for the API walk-through.

Backends
--------
- ``"triton"``: the fused Triton kernel (`triton_decode`): attention and exact page
  mass in one pass over K/V. The fastest scoring path measured (docs/benchmarks.md).
- ``"flashinfer"``: FlashInfer's batch decode over token slots with ``return_lse``,
  then the Triton kernel of `page_mass` re-reads K of the scored pages.
- ``"auto"`` (default): per batch, at plan time: scoring batches take the fused Triton
  kernel; batches planned with ``score=False`` (dense, quest) take FlashInfer when it
  is installed (its plain subset kernel is the fastest there), else Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from raas_backend.kernels.cuda.indexing import PageLayout, SparseIndices, layout_from_token_page

if TYPE_CHECKING:
    from raas_backend.kernels.cuda.flashinfer_decode import FlashInferDecode
    from raas_backend.kernels.cuda.triton_decode import TritonDecodeConfig

Backend = Literal["auto", "flashinfer", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "flashinfer", "triton")
LOG2E = 1.4426950408889634


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def flashinfer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


@dataclass
class DecodePlan:
    """What `SparseDecoder.plan` fixed for one batch (read by every layer's run).

    Attributes
    ----------
    kv_indptr : shape [B + 1], dtype torch.int32 (device).
    kv_indices : shape [nnz], dtype torch.int32 (device).
    layout : the page layout (None: no scoring possible).
    sm_scale : softmax scale.
    max_len : host int, the longest list.
    engine : "triton" or "flashinfer", the kernel this batch runs on.
    workspace : the fused kernel's partial buffers, reused by every layer.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    layout: PageLayout | None
    sm_scale: float
    max_len: int
    engine: str
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.kv_indptr.numel() - 1


class SparseDecoder:
    """Sparse-page decode attention + exact page mass on CUDA.

    Parameters
    ----------
    num_qo_heads, num_kv_heads, head_dim : the attention layout of the model.
    dtype : q and KV cache dtype (torch.bfloat16 or torch.float16).
    device : the CUDA device.
    backend : "auto", "triton" or "flashinfer" (module docstring).
    use_tensor_cores : FlashInfer's kernel path; None chooses (see flashinfer_decode).
    triton_config : tiling of the fused Triton kernel (`TritonDecodeConfig`).
    """

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
        backend: Backend = "auto",
        use_tensor_cores: bool | None = None,
        triton_config: TritonDecodeConfig | None = None,
    ) -> None:
        _expect(backend in BACKENDS, f"expected backend in {BACKENDS}, got {backend!r}")
        _expect(
            num_kv_heads >= 1 and num_qo_heads % num_kv_heads == 0,
            f"expected num_qo_heads divisible by num_kv_heads, got {num_qo_heads}/{num_kv_heads}",
        )
        _expect(
            dtype in (torch.bfloat16, torch.float16),
            f"expected dtype bfloat16 or float16, got {dtype}",
        )
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self.triton_config = triton_config
        self._use_tensor_cores = use_tensor_cores
        self._fi: FlashInferDecode | None = None
        self._plan: DecodePlan | None = None

    @property
    def use_tensor_cores(self) -> bool | None:
        """FlashInfer's kernel path, once FlashInfer has been used (else None)."""
        return None if self._fi is None else self._fi.use_tensor_cores

    def _flashinfer(self) -> FlashInferDecode:
        if self._fi is None:
            from raas_backend.kernels.cuda.flashinfer_decode import FlashInferDecode

            self._fi = FlashInferDecode(
                self.num_qo_heads,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
                self.device,
                self._use_tensor_cores,
            )
        return self._fi

    def _engine(self, score: bool) -> str:
        if self.backend != "auto":
            return self.backend
        if score or not flashinfer_available():
            return "triton"
        return "flashinfer"

    def plan(
        self,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        *,
        sm_scale: float,
        layout: PageLayout | None = None,
        kv_indptr_host: torch.Tensor | None = None,
        max_len: int | None = None,
        score: bool | None = None,
    ) -> DecodePlan:
        """Fix the batch's lists for all layers of this step.

        kv_indptr: shape [B + 1], dtype torch.int32, on the device.
        kv_indices: shape [nnz], dtype torch.int32, on the device (may be rewritten in
            place between runs with the same per-request counts, as Quest does).
        layout: where the scored pages lie (needed for page mass).
        kv_indptr_host: shape [B + 1], dtype torch.int32, on the CPU; copied from
            kv_indptr (one sync) when omitted. max_len: the longest list, likewise.
        score: whether the runs of this batch will score (default: a layout is given);
            picks the kernel under backend "auto".
        """
        _expect(kv_indptr.dtype == torch.int32, f"expected int32 kv_indptr, got {kv_indptr.dtype}")
        _expect(
            kv_indices.dtype == torch.int32, f"expected int32 kv_indices, got {kv_indices.dtype}"
        )
        _expect(
            kv_indptr.device == kv_indices.device,
            f"expected kv_indptr and kv_indices on one device, got {kv_indptr.device} and "
            f"{kv_indices.device}",
        )
        batch = kv_indptr.numel() - 1
        if kv_indptr_host is None:
            kv_indptr_host = kv_indptr.cpu()
        _expect(
            kv_indptr_host.numel() == batch + 1,
            f"expected kv_indptr_host of {batch + 1}, got {kv_indptr_host.numel()}",
        )
        if max_len is None:
            lens = kv_indptr_host[1:] - kv_indptr_host[:-1]
            max_len = int(lens.max()) if batch else 0
        if layout is not None:
            _expect(
                layout.scored_start.numel() == batch and layout.page_indptr.numel() == batch + 1,
                f"expected a layout for a batch of {batch}, got "
                f"{layout.scored_start.numel()} requests",
            )
        engine = self._engine(layout is not None if score is None else score)
        if engine == "flashinfer":
            self._flashinfer().plan(kv_indptr_host, kv_indices, sm_scale)
        self._plan = DecodePlan(
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            layout=layout,
            sm_scale=sm_scale,
            max_len=max_len,
            engine=engine,
        )
        return self._plan

    def plan_indices(
        self, indices: SparseIndices, *, sm_scale: float, score: bool = True
    ) -> DecodePlan:
        """`plan` from `build_sparse_indices`' output (no sync)."""
        return self.plan(
            indices.kv_indptr,
            indices.kv_indices,
            sm_scale=sm_scale,
            layout=indices.layout,
            kv_indptr_host=indices.kv_indptr_host,
            max_len=indices.max_len,
            score=score,
        )

    def _check_inputs(
        self, plan: DecodePlan, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor
    ) -> None:
        want_q = (plan.batch, self.num_qo_heads, self.head_dim)
        _expect(q.shape == want_q, f"expected q of shape {want_q}, got {tuple(q.shape)}")
        _expect(q.dtype == self.dtype, f"expected q of dtype {self.dtype}, got {q.dtype}")
        hkv, dim = self.num_kv_heads, self.head_dim
        _expect(
            k_buffer.dim() == 3 and tuple(k_buffer.shape[1:]) == (hkv, dim),
            f"expected k_buffer of shape [num_slots, {hkv}, {dim}], got {tuple(k_buffer.shape)}",
        )
        _expect(
            v_buffer.shape == k_buffer.shape,
            f"expected v_buffer of shape {tuple(k_buffer.shape)}, got {tuple(v_buffer.shape)}",
        )
        _expect(
            k_buffer.dtype == self.dtype and v_buffer.dtype == self.dtype,
            f"expected KV of dtype {self.dtype}, got {k_buffer.dtype}/{v_buffer.dtype}",
        )

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        *,
        score: bool = True,
        head_max_into: torch.Tensor | None = None,
        page_mass_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's decode attention (and page mass) for the planned batch.

        q: shape [B, num_qo_heads, head_dim], dtype as constructed.
        k_buffer, v_buffer: shape [num_slots, num_kv_heads, head_dim], the layer's pools.
        score: compute the page mass (needs a plan with a layout).
        head_max_into: optional shape [layout.num_pages], dtype torch.float32, >= 0; gets
            max(itself, max over heads of the mass): the default RaaS aggregation over
            heads and layers, without a separate reduction.
        page_mass_out: optional shape [layout.num_pages, num_qo_heads], dtype
            torch.float32, written in full (a preallocated output).
        Returns (out: [B, num_qo_heads, head_dim] dtype of q, page_mass:
        [layout.num_pages, num_qo_heads] float32, or None when not scoring).
        """
        plan = self._plan
        if plan is None:
            raise ValueError("expected plan() before run(), got no plan")
        self._check_inputs(plan, q, k_buffer, v_buffer)
        if score:
            _expect(
                plan.layout is not None,
                "expected a plan with a page layout to score, got a plan without one",
            )
        if plan.engine == "triton":
            from raas_backend.kernels.cuda.triton_decode import fused_sparse_decode

            layout = plan.layout if plan.layout is not None else _empty_layout(plan)
            out, _, mass = fused_sparse_decode(
                q,
                k_buffer,
                v_buffer,
                plan.kv_indptr,
                plan.kv_indices,
                layout,
                plan.sm_scale,
                plan.max_len,
                score=score,
                head_max_into=head_max_into,
                mass_out=page_mass_out,
                config=self.triton_config,
                workspace=plan.workspace,
            )
            return out, mass
        out, lse = self._flashinfer().run(q, k_buffer, v_buffer, return_lse=score)
        if not score:
            return out, None
        from raas_backend.kernels.cuda.page_mass import page_mass_from_lse

        assert lse is not None and plan.layout is not None
        mass = page_mass_from_lse(
            q,
            k_buffer,
            plan.kv_indptr,
            plan.kv_indices,
            lse,
            plan.layout,
            plan.sm_scale,
            out=page_mass_out,
            head_max_into=head_max_into,
            pages_per_block=8,
        )
        return out, mass

    def run_with_lse(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention and its base-2 LSE (shape [B, num_qo_heads], float32), no scoring."""
        plan = self._plan
        if plan is None:
            raise ValueError("expected plan() before run(), got no plan")
        self._check_inputs(plan, q, k_buffer, v_buffer)
        if plan.engine == "flashinfer":
            out, lse = self._flashinfer().run(q, k_buffer, v_buffer, return_lse=True)
            assert lse is not None
            return out, lse
        from raas_backend.kernels.cuda.triton_decode import fused_sparse_decode

        layout = plan.layout if plan.layout is not None else _empty_layout(plan)
        out, lse, _ = fused_sparse_decode(
            q, k_buffer, v_buffer, plan.kv_indptr, plan.kv_indices, layout, plan.sm_scale,
            plan.max_len, score=False, config=self.triton_config, workspace=plan.workspace,
        )  # fmt: skip
        return out, lse


def _empty_layout(plan: DecodePlan) -> PageLayout:
    """A layout with no scored pages (every entry counted as prompt)."""
    lens = (plan.kv_indptr[1:] - plan.kv_indptr[:-1]).to(torch.int32)
    return PageLayout(
        page_size=16,
        scored_start=lens,
        page_indptr=torch.zeros(plan.batch + 1, dtype=torch.int32, device=lens.device),
        num_pages=0,
        max_pages_per_request=0,
    )


def generic_page_mass(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    lse: torch.Tensor,
    token_page: torch.Tensor,
    num_pages: int,
    sm_scale: float,
) -> torch.Tensor:
    """Page mass for any ``token_page`` (plain torch; the fallback of `sparse_decode`).

    q: shape [B, num_qo_heads, head_dim]; k_buffer: shape [num_slots, num_kv_heads,
    head_dim]; kv_indptr: shape [B + 1], integer; kv_indices, token_page: shape [nnz],
    integer; lse: shape [B, num_qo_heads], float32, base 2.
    Returns shape [num_pages, num_qo_heads], dtype torch.float32.
    """
    batch, hq, dim = q.shape
    hkv = k_buffer.shape[1]
    nnz = kv_indices.numel()
    indptr = kv_indptr.long()
    req = torch.repeat_interleave(
        torch.arange(batch, device=q.device), indptr[1:] - indptr[:-1], output_size=nnz
    )
    tp = token_page.long()
    keep = tp >= 0
    k = k_buffer[kv_indices.long()[keep]].float()  # [n, hkv, d]
    qq = q.float()[req[keep]].view(-1, hkv, hq // hkv, dim)
    s = torch.einsum("nhgd,nhd->nhg", qq, k).reshape(-1, hq) * (sm_scale * LOG2E)
    prob = torch.exp2(s - lse[req[keep]])
    mass = torch.zeros(num_pages, hq, dtype=torch.float32, device=q.device)
    mass.index_add_(0, tp[keep], prob)
    return mass


def sparse_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    token_page: torch.Tensor | None = None,
    num_pages: int = 0,
    *,
    page_size: int = 16,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`torch_ref.sparse_decode` on CUDA: same arguments, same results (bf16 rounding).

    q: shape [B, num_qo_heads, head_dim], dtype bfloat16/float16, on a CUDA device.
    k_buffer, v_buffer: shape [num_slots, num_kv_heads, head_dim], dtype of q.
    kv_indptr: shape [B + 1], int32 or int64. kv_indices: shape [nnz], int32 or int64.
    token_page: shape [nnz], integer, global page id in [0, num_pages) or -1; None: no
        scoring. Lists in the page layout of `build_sparse_indices` (prompt first, then
        runs of ``page_size``) take the fast scoring kernels; any other ``token_page``
        falls back to `generic_page_mass` (correct, slower).
    Returns (out: [B, num_qo_heads, head_dim] dtype of q, page_mass: [num_pages,
    num_qo_heads] float32 or None). Builds a decoder per call: engines hold a
    `SparseDecoder` and plan once per batch instead.
    """
    _expect(q.dim() == 3, f"expected q of shape [B, heads, dim], got {tuple(q.shape)}")
    indptr = kv_indptr.to(device=q.device, dtype=torch.int32)
    indices = kv_indices.to(device=q.device, dtype=torch.int32)
    layout = None
    if token_page is not None:
        _expect(
            token_page.numel() == kv_indices.numel(),
            f"expected token_page of {kv_indices.numel()} entries, got {token_page.numel()}",
        )
        layout = layout_from_token_page(indptr, token_page.to(q.device), num_pages, page_size)
    dec = SparseDecoder(
        q.shape[1], k_buffer.shape[1], q.shape[2], dtype=q.dtype, device=q.device, backend=backend
    )
    if token_page is None or layout is not None:
        dec.plan(indptr, indices, sm_scale=sm_scale, layout=layout)
        return dec.run(q, k_buffer, v_buffer, score=token_page is not None)
    # A page numbering the fast kernels do not know: attention + LSE, then plain torch.
    dec.plan(indptr, indices, sm_scale=sm_scale, score=False)
    out, lse = dec.run_with_lse(q, k_buffer, v_buffer)
    mass = generic_page_mass(
        q, k_buffer, indptr, indices, lse, token_page.to(q.device), num_pages, sm_scale
    )
    return out, mass
