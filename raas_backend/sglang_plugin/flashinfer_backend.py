"""The `raas` attention backend on CUDA: SGLang's FlashInfer backend with sparse decode.

Prefill and extend (ragged/paged, chunked) are SGLang's FlashInfer backend unchanged.
Decode differs in one place: the token lists FlashInfer attends are each request's
prompt, retained pages and tail (`step_lists`), not its whole history, and each layer
also sums the attention probability of every scored page (`page_mass_from_lse` from
FlashInfer's log-sum-exp) into static accumulators (`step_scores`).

CUDA graphs follow SGLang's protocol: `init_forward_metadata_out_graph` (outside the
graph, every replay) builds the lists into the graph wrapper's static indices buffer
and plans FlashInfer with host-side offsets; `init_forward_metadata_in_graph` (inside)
zeroes the score accumulators; each layer's decode and page-mass launch are captured
with grids sized for the largest budget (`RAAS_MAX_BUDGET_TOKENS`), reading the step's
real page counts from static device buffers. The host never reads the device while
building a step: row ids and lengths come from the scheduler hook, which saw the batch
on the host, and which pages each request holds from the batched device state
(`kernels.row_policy_state`), which the next step's bookkeeping updates from the
accumulators without reading them back (`PendingScores.fold`). With
RAAS_POLICY_STATE=host the per-request states plan the lists instead, and the scores are
read back once per step.

Not served here yet (refused at start or at request validation with what to change):
sliding-window and cross-attention models, FP8 KV caches, logit soft-capping, and the
quest policy (it selects pages per layer from that layer's query).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata, FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from raas_backend.kernels.cuda.indexing import PageLayout
from raas_backend.sglang_plugin.runtime import activate_runtime, pages_cap
from raas_backend.sglang_plugin.server_requirements import check_server_args
from raas_backend.sglang_plugin.step_lists import build_step_lists, expand_segments, plan_step
from raas_backend.sglang_plugin.step_scores import PendingScores, StepScores

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


SOFT_CAP_REFUSED = (
    "raas scores pages from exact softmax probabilities and does not serve logit "
    "soft-capping models yet: use --attention-backend flashinfer"
)


__all__ = ["SOFT_CAP_REFUSED", "RaasFlashInferBackend", "pages_cap"]


class RaasFlashInferBackend(FlashInferAttnBackend):
    def __init__(self, model_runner: ModelRunner) -> None:
        check_server_args(model_runner.server_args)
        super().__init__(model_runner)
        if model_runner.page_size != 1:
            raise ValueError(
                f"raas expects SGLang's token page size 1, got {model_runner.page_size}: "
                "start without --page-size"
            )
        if self.num_wrappers != 1:
            raise ValueError(
                "raas on CUDA serves models with full attention in every layer; this model "
                "has sliding-window or cross-attention layers: use --attention-backend "
                "flashinfer for it"
            )
        if self.decode_uses_dequant_workspace or self.flashinfer_kv_cache_dtype not in (
            torch.bfloat16,
            torch.float16,
        ):
            raise ValueError(
                f"raas on CUDA needs a bf16/fp16 KV cache, got {self.flashinfer_kv_cache_dtype}: "
                "start with --kv-cache-dtype auto"
            )
        hf = model_runner.model_config.hf_config
        if getattr(hf, "attn_logit_softcapping", None):
            raise ValueError(SOFT_CAP_REFUSED)
        self.runtime = activate_runtime()
        # SGLang's own `page_size` (token slots per page, 1) stays the parent's.
        self.raas_page_size = self.runtime.defaults.page_size
        self.pages_cap = pages_cap(self.raas_page_size)
        _check_kernel_limits(self.raas_page_size, model_runner)
        self.max_rows = model_runner.req_to_token_pool.size
        # The policies' state, one row per req_to_token row, on the GPU.
        rtt = model_runner.req_to_token_pool.req_to_token
        self.runtime.attach_device_state(rtt.shape[0], rtt.device)
        updater = self.indices_updater_decode
        self.num_qo_heads = updater.num_qo_heads
        self.num_kv_heads = updater.num_kv_heads
        self.head_dim = updater.head_dim
        self.kv_data_type = updater.data_type
        self.q_data_type = updater.q_data_type
        self.device = torch.device(model_runner.device)
        tp_size, all_reduce = _tensor_parallel()
        self.scores = StepScores(
            self.max_rows * self.pages_cap, self.num_qo_heads, self.device, tp_size
        )
        self.tp_size = tp_size
        self.all_reduce = all_reduce
        # Static layout buffers the page-mass kernel reads (graph-captured addresses).
        self.scored_start = torch.zeros(self.max_rows + 1, dtype=torch.int32, device=self.device)
        self.page_indptr = torch.zeros(self.max_rows + 2, dtype=torch.int32, device=self.device)
        self.scoring = False
        self.decode_bs = 0
        # Host-side ones: FlashInfer's plan reads last_page_len on the host, and a device
        # tensor there would cost a synchronisation every step.
        self.last_page_len_host = torch.ones(self.max_rows + 1, dtype=torch.int32).pin_memory()

    # -- metadata ---------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        if not forward_batch.forward_mode.is_decode():
            super().init_forward_metadata(forward_batch)
            return
        self._plan_decode(forward_batch, self.decode_wrappers, graph=False)
        self.forward_metadata = DecodeMetadata(self.decode_wrappers)
        self.scores.begin_step(forward_batch.batch_size * self.pages_cap)

    def init_forward_metadata_out_graph(
        self, forward_batch: ForwardBatch, in_capture: bool = False
    ) -> None:
        if not forward_batch.forward_mode.is_decode():
            super().init_forward_metadata_out_graph(forward_batch, in_capture)
            return
        bs = forward_batch.batch_size
        if in_capture:
            self._prepare_cuda_graph_metadata(
                bs,
                forward_batch.positions.numel(),
                forward_batch.forward_mode,
                forward_batch.spec_info,
            )
        wrappers = self.decode_cuda_graph_metadata[bs]
        self._plan_decode(forward_batch, wrappers, graph=True, in_capture=in_capture)
        self.forward_metadata = DecodeMetadata(wrappers)

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch) -> None:
        if forward_batch.forward_mode.is_decode():
            self.scores.begin_step(forward_batch.batch_size * self.pages_cap)
        else:
            super().init_forward_metadata_in_graph(forward_batch)

    def _plan_decode(
        self,
        fb: ForwardBatch,
        wrappers: list,
        *,
        graph: bool,
        in_capture: bool = False,
    ) -> None:
        bs = fb.batch_size
        if fb.seq_lens_cpu is not None:
            seq_lens = fb.seq_lens_cpu[:bs].tolist()
        elif in_capture:
            seq_lens = [self.get_cuda_graph_seq_len_fill_value()] * bs
        else:
            # SGLang passes host lengths on every decode path raas allows; never guess.
            raise RuntimeError("raas: a decode batch without host sequence lengths")
        if in_capture:
            # Dummy rows: no request is tracked; attend them densely.
            rows, states = [0] * bs, [None] * bs
        else:
            taken = self.runtime.take_step_batch()
            # A decode forward no scheduler step announced (SGLang's warm-up and autotune
            # dummy runs): no request is tracked, attend densely, report no scores.
            rows, states = taken if taken is not None else ([0] * bs, [None] * bs)
            real = bs - int(getattr(fb, "num_padding", 0) or 0) if taken is not None else bs
            if len(rows) != real:
                raise RuntimeError(
                    f"raas: the scheduler listed {len(rows)} decode requests, the forward "
                    f"batch has {real}"
                )
            # CUDA-graph padding rows: one dummy position each, output discarded.
            rows, states = list(rows) + [0] * (bs - real), list(states) + [None] * (bs - real)
        wrapper = wrappers[0]
        rtt = self.req_to_token_pool.req_to_token
        device = self.runtime.device_state
        out = wrapper._paged_kv_indices_buf if graph else None
        if device is not None:
            # Sizes from the host's counts; which pages, from the device state.
            lists = plan_step(rows, seq_lens, states)
            self._check_pages(lists.max_pages_per_request)
            kv_indices, _ = device.build_lists(
                rows, lists.heads, lists.lengths, lists.page_starts, rtt, out=out
            )
        else:
            lists = build_step_lists(rows, seq_lens, states)
            self._check_pages(lists.max_pages_per_request)
            kv_indices, _ = expand_segments(lists, rtt, out=out)
        wrapper.begin_forward(
            lists.kv_indptr,
            kv_indices,
            self.last_page_len_host[:bs],
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            data_type=self.kv_data_type,
            q_data_type=self.q_data_type,
            non_blocking=True,
        )
        self.scored_start[:bs].copy_(lists.scored_start, non_blocking=True)
        self.page_indptr[: bs + 1].copy_(lists.page_indptr, non_blocking=True)
        self.decode_bs = bs
        # A graph replays its page-mass launches whatever the step; eager steps skip
        # them when no request is scored.
        self.scoring = graph or lists.num_pages > 0
        if not in_capture and lists.num_pages > 0:
            self.runtime.pending_scores = PendingScores(
                acc=self.scores.acc,
                num_pages=lists.num_pages,
                layers=self.num_attention_layers,
                page_indptr=lists.page_indptr.tolist(),
                states=lists.states,
                tp_size=self.tp_size,
                all_reduce=self.all_reduce,
                rows=list(rows),
            )

    def _check_pages(self, most: int) -> None:
        if most > self.pages_cap:
            raise RuntimeError(
                f"raas: a request lists {most} scored pages, more than "
                f"the {self.pages_cap} RAAS_MAX_BUDGET_TOKENS sizes the kernels for"
            )

    @property
    def num_attention_layers(self) -> int:
        return self.token_to_kv_pool.layer_num

    # -- decode -----------------------------------------------------------------------

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        if layer.is_cross_attention:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if layer.logit_cap:
            raise ValueError(SOFT_CAP_REFUSED)
        wrapper = self.forward_metadata.decode_wrappers[0]
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer,
                KVWriteLoc.for_layer(
                    forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc
                ),
                k,
                v,
                *self._kv_write_scales(layer),
            )
        kv_cache = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        q_ = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        # Host floats (k_scale_float): a tensor scale would sync inside a graph.
        kwargs = {
            "sm_scale": layer.scaling,
            "logits_soft_cap": layer.logit_cap,
            "k_scale": layer.k_scale_float,
            "v_scale": layer.v_scale_float,
        }
        if not self.scoring:
            o = wrapper.forward(q_, kv_cache, **kwargs)
            return o.view(-1, layer.tp_q_head_num * layer.head_dim)
        o, lse = wrapper.forward_return_lse(q_, kv_cache, **kwargs)
        from raas_backend.kernels.cuda.page_mass import page_mass_from_lse

        bs = self.decode_bs
        # Static page capacity for this batch size: a graph replays these shapes.
        limit = bs * self.pages_cap
        layout = PageLayout(
            page_size=self.raas_page_size,
            scored_start=self.scored_start[:bs],
            page_indptr=self.page_indptr[: bs + 1],
            num_pages=limit,
            max_pages_per_request=self.pages_cap,
        )
        page_mass_from_lse(
            q_,
            kv_cache[0],
            wrapper._paged_kv_indptr_buf[: bs + 1],
            wrapper._paged_kv_indices_buf,
            lse,
            layout,
            # FlashInfer folds k_scale into the logits' scale; the LSE includes it.
            layer.scaling * (layer.k_scale_float or 1.0),
            out=self.scores.mass[:limit],
        )
        self.scores.add_layer(limit)
        return o.view(-1, layer.tp_q_head_num * layer.head_dim)


def _check_kernel_limits(page_size: int, model_runner: ModelRunner) -> None:
    """What the page-mass kernel needs, refused at start rather than at a graph capture."""
    import os

    problems = []
    if page_size & (page_size - 1):
        problems.append(f"RAAS_PAGE_SIZE a power of two (got {page_size})")
    head_dim = model_runner.model_config.head_dim
    if head_dim & (head_dim - 1):
        problems.append(f"a power-of-two head_dim (this model has {head_dim})")
    if os.environ.get("SGLANG_USE_HND_KVCACHE", "").lower() in ("1", "true"):
        problems.append("the NHD KV layout (unset SGLANG_USE_HND_KVCACHE)")
    if os.environ.get("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "").lower() in ("1", "true"):
        problems.append(
            "its step lists built on the host (unset SGLANG_ENABLE_METADATA_GLUE_GRAPH)"
        )
    if problems:
        raise ValueError("raas on CUDA needs " + "; ".join(problems))


def _tensor_parallel() -> tuple[int, object | None]:
    """(tp size, all_reduce(tensor, op)) over SGLang's tensor-parallel group."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    size = parallel.tp_size
    if size == 1:
        return 1, None
    group = parallel.tp_group.device_group
    ops = {"max": torch.distributed.ReduceOp.MAX, "sum": torch.distributed.ReduceOp.SUM}

    def all_reduce(t: torch.Tensor, op: str) -> None:
        torch.distributed.all_reduce(t, op=ops[op], group=group)

    return size, all_reduce
