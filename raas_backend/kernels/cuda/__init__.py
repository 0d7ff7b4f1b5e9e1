"""The CUDA path of sparse-page decode: FlashInfer decode + Triton page scoring.

Same contract as `raas_backend.kernels.torch_ref.sparse_decode`, for CUDA hosts.
Importing this package needs neither Triton nor FlashInfer: the modules that use them
are imported on first use (`indexing` is plain torch and also runs on the CPU).

API for an attention backend
----------------------------
Once per decode step (all layers share it)::

    from raas_backend.kernels.cuda import SparseDecoder, build_sparse_indices

    dec = SparseDecoder(num_qo_heads, num_kv_heads, head_dim,
                        dtype=torch.bfloat16, device="cuda")        # backend="auto"
    idx = build_sparse_indices(req_to_token, req_rows, prompt_lens, seq_lens,
                               pages, num_pages, page_size=16)   # one host sync
    dec.plan_indices(idx, sm_scale=scaling)                      # score=True

- ``req_to_token``: [rows, max_context] int32/int64, the engine's position -> slot table
  (SGLang's ``req_to_token_pool.req_to_token``); ``req_rows``: [B] int64;
  ``prompt_lens``, ``seq_lens``, ``num_pages``: [B] int32; ``pages``: [B, cap] int32,
  retained logical decode pages ascending (tail last), -1 padded: the rows of
  `raas_backend.kernels.batched_policy.BatchedRaaSState`.
- ``idx.kv_indptr`` [B+1] int32, ``idx.kv_indices`` [nnz] int32 and ``idx.token_page``
  [nnz] int32 are exactly the ``kv_indptr``/``kv_indices``/``token_page`` arguments of
  ``torch_ref.sparse_decode``; ``idx.layout.num_pages`` is its ``num_pages``.

Per layer::

    out, page_mass = dec.run(q, k_buffer, v_buffer, head_max_into=step_scores)

- ``q``: [B, num_qo_heads, head_dim] bf16/fp16; ``k_buffer``/``v_buffer``: the layer's
  pools, [num_slots, num_kv_heads, head_dim] (SGLang's per-layer buffers).
- ``out``: [B, num_qo_heads, head_dim]; ``page_mass``: [num_pages, num_qo_heads] float32,
  each page's softmax probability mass per query head (exact up to bf16 rounding of the
  probabilities, not a bound; see `TritonDecodeConfig.page_dot`).
- ``step_scores`` (optional): [num_pages] float32 zeros at the start of the step; each
  layer folds in max over heads, so after the last layer it holds the RaaS score with
  ``head_agg = layer_agg = "max"`` (other aggregations: reduce ``page_mass`` instead).

Then, once per step::

    evicted = decode_step(state, step_scores, step, alpha)    # one Triton launch
    free = victim_slots(evicted, state.prompt_lens, 16, req_to_token, req_rows)

(`raas_backend.kernels.batched_policy`): timestamps, page opening, victim selection and
compaction for the whole batch, in place; ``free`` are the slots to return to the
allocator (one sync).

Quest (`raas_backend.kernels.cuda.quest`): ``plan_quest`` once per step and
``dec.plan(qp.kv_indptr, qp.kv_indices, sm_scale=..., kv_indptr_host=qp.kv_indptr_host,
score=False)``; per layer ``update_page_bounds`` (new key), ``quest_select`` (Triton
bound, top-k, index fill) and ``dec.run(q, k, v, score=False)``.

One-shot form with the reference's exact signature: `sparse_decode` (builds a decoder
per call; for tests and tools).

Backends: "triton" is one fused split-KV Triton kernel that reads K and V once and gets
each page's log-sum-exp from the same exponentials; "flashinfer" runs FlashInfer's
batch decode over token slots (page_size 1) with ``return_lse`` and a Triton kernel
that re-reads K of the scored pages and sums ``exp2(s * sm_scale * log2(e) - lse)`` per
page; "auto" takes the first for scoring batches and FlashInfer for the others.
``run`` has no host sync (grid sizes come from the plan), and every run path was
captured and replayed in CUDA graphs by the benchmark; ``plan`` and the index build
sync and stay outside a graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raas_backend.kernels.cuda.indexing import (
    PageLayout,
    SparseIndices,
    build_sparse_indices,
    layout_from_token_page,
)

if TYPE_CHECKING:
    from raas_backend.kernels.cuda.decode import DecodePlan, SparseDecoder, sparse_decode

_LAZY = {
    "SparseDecoder": "raas_backend.kernels.cuda.decode",
    "DecodePlan": "raas_backend.kernels.cuda.decode",
    "sparse_decode": "raas_backend.kernels.cuda.decode",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DecodePlan",
    "PageLayout",
    "SparseDecoder",
    "SparseIndices",
    "build_sparse_indices",
    "layout_from_token_page",
    "sparse_decode",
]
