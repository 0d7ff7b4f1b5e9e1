"""Sparse-page decode attention and page scoring.

`torch_ref` is the CPU implementation and the oracle; the CUDA implementation
(FlashInfer decode + Triton scoring) implements the same functions with the same
shapes. Nothing here imports SGLang.
"""
