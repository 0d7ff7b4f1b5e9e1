"""FlashInfer batch decode over token slots (page_size 1), plan once, run per layer.

Why page_size 1: SGLang gives every token its own slot from a free list, and our
logical pages start at ``prompt_len`` (not at a multiple of 16), so the 16 slots of a
logical page are neither contiguous nor aligned in the pool. FlashInfer's page_size 16
would need them to be (a "physical" page of 16 consecutive slots). With page_size 1
every list entry is one slot, any order is valid and no tail-page rule applies; the
cost is one 4-byte index per token instead of per 16 tokens.

Kernel path: FlashInfer's CUDA-core decode kernel supports GQA group sizes
{1, 2, 3, 4, 6, 8, 16} only; other groups (7 for Qwen2.5-7B) need the tensor-core
(prefill-kernel) path. On Hopper the tensor-core path was also measured faster for
group 4 (see docs/benchmarks.md), so ``use_tensor_cores=None`` picks it on sm90+ and
wherever the group needs it.
"""

from __future__ import annotations

import torch

CUDA_CORE_GROUPS = frozenset({1, 2, 3, 4, 6, 8, 16})


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def choose_tensor_cores(group: int, device: torch.device, requested: bool | None) -> bool:
    """The kernel path for a GQA group size on a device (see the module docstring)."""
    if group not in CUDA_CORE_GROUPS:
        if requested is False:
            raise ValueError(
                f"expected a GQA group in {sorted(CUDA_CORE_GROUPS)} for the CUDA-core "
                f"path, got {group}: use tensor cores"
            )
        return True
    if requested is not None:
        return requested
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True


class FlashInferDecode:
    """One ``BatchDecodeWithPagedKVCacheWrapper`` over token slots.

    Parameters
    ----------
    num_qo_heads, num_kv_heads, head_dim : the attention layout.
    dtype : q and KV dtype (bfloat16 or float16).
    device : the CUDA device.
    use_tensor_cores : None picks as `choose_tensor_cores` says.
    workspace_bytes : FlashInfer's float workspace (split-KV partials).
    """

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        use_tensor_cores: bool | None = None,
        workspace_bytes: int = 128 << 20,
    ) -> None:
        import flashinfer  # lazy: only CUDA hosts have (and need) it

        _expect(
            num_qo_heads % num_kv_heads == 0,
            f"expected num_qo_heads divisible by num_kv_heads, got {num_qo_heads}/{num_kv_heads}",
        )
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.use_tensor_cores = choose_tensor_cores(
            num_qo_heads // num_kv_heads, self.device, use_tensor_cores
        )
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self.use_tensor_cores
        )
        self._batch = -1

    def plan(
        self,
        kv_indptr_host: torch.Tensor,
        kv_indices: torch.Tensor,
        sm_scale: float,
    ) -> None:
        """Plan one batch.

        kv_indptr_host: shape [B + 1], dtype torch.int32, on the CPU (no sync needed).
        kv_indices: shape [nnz], dtype torch.int32, on the device; read at run() time, so
            it may be rewritten in place between runs (Quest's per-layer selection) as
            long as the per-request counts stay those of kv_indptr_host.
        """
        _expect(
            kv_indptr_host.device.type == "cpu",
            f"expected a CPU kv_indptr_host, got {kv_indptr_host.device}",
        )
        _expect(
            kv_indices.dtype == torch.int32, f"expected int32 kv_indices, got {kv_indices.dtype}"
        )
        batch = kv_indptr_host.numel() - 1
        last_page_len = torch.ones(batch, dtype=torch.int32)
        self._wrapper.plan(
            kv_indptr_host.to(torch.int32),
            kv_indices,
            last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            pos_encoding_mode="NONE",
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=sm_scale,
        )
        self._batch = batch

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        return_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention for the planned batch.

        q: shape [B, num_qo_heads, head_dim]; k_buffer, v_buffer: shape
        [num_slots, num_kv_heads, head_dim], dtype as planned.
        Returns (out [B, num_qo_heads, head_dim], lse [B, num_qo_heads] float32 base 2 or None).
        """
        _expect(
            q.shape[0] == self._batch,
            f"expected q for the planned batch of {self._batch}, got {q.shape[0]}",
        )
        kc = k_buffer.unsqueeze(1)
        vc = v_buffer.unsqueeze(1)
        if return_lse:
            out, lse = self._wrapper.run(q, (kc, vc), return_lse=True)
            return out, lse
        return self._wrapper.run(q, (kc, vc)), None
