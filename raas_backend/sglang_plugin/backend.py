"""The `raas` attention backend for SGLang off CUDA (the torch path; CUDA hosts get
`flashinfer_backend.RaasFlashInferBackend`).

Prefill runs as in SGLang's torch-native backend (full causal attention over the
prompt). Each decode step attends, per request, over the prompt, the pages its policy
retains and the tail page; the page scores the policy needs come from the same
attention probabilities. The index (CSR over slots) is built once per step in
`init_forward_metadata` and read by every layer; quest requests re-select pages per
layer from that layer's query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from raas_backend.kernels import torch_ref
from raas_backend.kernels.torch_ref import page_key_bounds, quest_bounds
from raas_backend.request_kv import RequestKV, head_aggregate
from raas_backend.sglang_plugin.runtime import activate_runtime
from raas_backend.sglang_plugin.server_requirements import check_server_args
from raas_backend.sglang_plugin.step_lists import build_step_lists, expand_segments, plan_step
from raas_backend.sglang_plugin.step_scores import PendingScores, StepScores

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


@dataclass
class DecodeIndex:
    """The slots each request attends this step, shared by all layers.

    kv_indptr: shape [batch + 1], dtype int64. kv_indices: shape [nnz], dtype int64.
    token_page: shape [nnz], dtype int64, global scored-page id or -1.
    page_offsets: first global page id of each request (len batch + 1).
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    token_page: torch.Tensor
    page_offsets: list[int]
    states: list[RequestKV | None]
    rows: list[int]
    any_scores: bool
    any_per_layer: bool
    # shape [nnz, num_kv_heads], dtype torch.bool: which KV heads attend each listed
    # token (quest per KV group, set per layer by _select_per_layer); None: all of them.
    kv_head_mask: torch.Tensor | None = None


class RaasAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner: ModelRunner) -> None:
        check_server_args(model_runner.server_args)
        super().__init__(model_runner)
        if model_runner.page_size != 1:
            raise ValueError(
                f"raas expects SGLang's token page size 1, got {model_runner.page_size}"
            )
        self.runtime = activate_runtime()
        rtt = self.req_to_token_pool.req_to_token
        self.runtime.attach_device_state(rtt.shape[0], rtt.device)
        self.decode_index: DecodeIndex | None = None
        self.step_scores: StepScores | None = None

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        super().init_forward_metadata(forward_batch)
        self.decode_index = (
            self._build_decode_index(forward_batch)
            if forward_batch.forward_mode.is_decode()
            else None
        )

    def _build_decode_index(self, fb: ForwardBatch) -> DecodeIndex:
        # The same lists as the CUDA backend builds (step_lists), so the CPU engine
        # tests run the logic the GPU path runs.
        rtt = self.req_to_token_pool.req_to_token
        rows = fb.req_pool_indices.tolist()
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        states = [self.runtime.get(row) for row in rows]
        if states and all(s is not None for s in states):
            hook_rows, _ = self.runtime.step_batch()
            if list(hook_rows) != rows:
                raise RuntimeError(
                    f"raas: the scheduler listed rows {hook_rows}, the forward batch {rows}"
                )
        device = self.runtime.device_state
        if device is not None:
            plan = plan_step(rows, seq_lens, states)
            kv_indices, token_page = device.build_lists(
                rows, plan.heads, plan.lengths, plan.page_starts, rtt, with_pages=True
            )
            kv_indptr, page_offsets = plan.kv_indptr, plan.page_indptr.tolist()
            num_pages = plan.num_pages
            self.step_scores = None
            if num_pages:
                # The scores stay where they are computed until the next step folds them
                # into the device state (as on CUDA, where they never leave the GPU).
                # Each layer's mass replaces `mass` (the head count comes with it).
                self.step_scores = StepScores(num_pages, 1, rtt.device)
                self.runtime.pending_scores = PendingScores(
                    acc=self.step_scores.acc,
                    num_pages=num_pages,
                    layers=self.token_to_kv_pool.layer_num,
                    page_indptr=page_offsets,
                    states=list(states),
                    rows=list(rows),
                )
        else:
            lists = build_step_lists(rows, seq_lens, states)
            kv_indices, token_page = expand_segments(lists, rtt)
            kv_indptr, page_offsets = lists.kv_indptr, lists.page_indptr.tolist()
            num_pages = lists.num_pages
        return DecodeIndex(
            kv_indptr=kv_indptr.to(torch.int64),
            kv_indices=kv_indices.to(torch.int64),
            token_page=token_page,
            page_offsets=page_offsets,
            states=states,
            rows=rows,
            any_scores=num_pages > 0,
            any_per_layer=any(s is not None and s.selects_per_layer for s in states),
        )

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        if layer.is_cross_attention or self.decode_index is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        index = self.decode_index
        if index.any_per_layer:
            index = self._select_per_layer(index, q_, k_buffer, layer.scaling)
        out, page_mass = self._sparse_decode(
            q_,
            k_buffer,
            v_buffer,
            index.kv_indptr,
            index.kv_indices,
            layer.scaling,
            index.token_page if index.any_scores else None,
            index.page_offsets[-1],
            **({} if index.kv_head_mask is None else {"kv_head_mask": index.kv_head_mask}),
        )
        if page_mass is not None and self.step_scores is not None and self.runtime.device_state:
            self.step_scores.mass = page_mass.float()
            self.step_scores.add_layer(page_mass.shape[0])
        elif page_mass is not None:
            # One reduction over heads per aggregation for the whole batch, then one
            # device-to-host copy; per request only slices remain.
            by_agg: dict[str, torch.Tensor] = {}
            for b, state in enumerate(index.states):
                if state is not None and state.needs_scores:
                    agg = state.config.head_agg
                    if agg not in by_agg:
                        by_agg[agg] = head_aggregate(page_mass, agg).float().cpu()
                    lo, hi = index.page_offsets[b], index.page_offsets[b + 1]
                    state.add_layer_scores(by_agg[agg][lo:hi])
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    @staticmethod
    def _sparse_decode(q: torch.Tensor, *args, **kwargs):
        """The CUDA kernels (FlashInfer + Triton) on a GPU, the torch path elsewhere.

        On CUDA this is the adapter's one-shot form (a decoder per layer call); holding a
        planned `SparseDecoder` per step and a CUDA-graph path are the next steps.
        """
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            from raas_backend.kernels.cuda import sparse_decode as cuda_sparse_decode

            return cuda_sparse_decode(q, *args, **kwargs)
        return torch_ref.sparse_decode(q, *args, **kwargs)

    def _select_per_layer(
        self, index: DecodeIndex, q: torch.Tensor, k_buffer: torch.Tensor, scale: float
    ) -> DecodeIndex:
        """Quest requests pick this layer's pages from its query; others keep theirs.

        Under quest's per-KV-group selection a request lists the union of its KV heads'
        pages and `kv_head_mask` says which head attends which token (the torch path
        masks the others out; the CUDA path does not serve quest).
        """
        rtt = self.req_to_token_pool.req_to_token
        num_kv_heads = k_buffer.shape[1]
        indptr = [0]
        indices: list[torch.Tensor] = []
        token_pages: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        bounds = index.kv_indptr.tolist()
        for b, state in enumerate(index.states):
            lo, hi = bounds[b], bounds[b + 1]
            if state is None or not state.selects_per_layer:
                # Co-batched raas/h2o requests keep their index and their scores.
                idx = index.kv_indices[lo:hi]
                pages = index.token_page[lo:hi]
                masks.append(None)
            else:
                table = state.table
                all_pos = table.retained_positions(table.retained)
                page_of = table.token_pages(table.retained)
                decode = page_of >= 0
                slots = rtt[index.rows[b], all_pos[decode].to(rtt.device)].to(torch.int64)
                kmin, kmax = page_key_bounds(k_buffer[slots], page_of[decode], len(table.retained))
                state.select_for_layer(quest_bounds(q[b], kmin, kmax, scale), num_kv_heads)
                masks.append(state.kv_head_mask())
                positions, _ = state.positions()
                idx = rtt[index.rows[b], positions.to(rtt.device)].to(torch.int64)
                pages = torch.full((idx.numel(),), -1, dtype=torch.int64, device=idx.device)
            indices.append(idx)
            token_pages.append(pages)
            indptr.append(indptr[-1] + idx.numel())
        return DecodeIndex(
            kv_indptr=torch.tensor(indptr, dtype=torch.int64),
            kv_indices=torch.cat(indices),
            token_page=torch.cat(token_pages),
            page_offsets=index.page_offsets,
            states=index.states,
            rows=index.rows,
            any_scores=index.any_scores,
            any_per_layer=True,
            kv_head_mask=_joined_masks(masks, indices, num_kv_heads),
        )


def _joined_masks(
    masks: list[torch.Tensor | None], indices: list[torch.Tensor], num_kv_heads: int
) -> torch.Tensor | None:
    """One [nnz, num_kv_heads] mask for the batch (rows without one: every head attends
    every token), or None when no request has one."""
    if all(m is None for m in masks):
        return None
    device = indices[0].device
    return torch.cat(
        [
            torch.ones(idx.numel(), num_kv_heads, dtype=torch.bool, device=device)
            if m is None
            else m.to(device)
            for m, idx in zip(masks, indices, strict=True)
        ]
    )
