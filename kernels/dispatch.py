"""Calls the CUDA kernel that sparse_llm.model.ffn chose for a sparse FFN call.

`kernel_ffn(kernel, x, w_gate, w_up, w_down)` with kernel `hybrid` (training kernels, forward and
backward, with statistics) or `twell` (inference kernels, no statistics). Returns
(y, l1_sum, tile_counts, neuron_counts), with None statistics where the kernel computes none.
"""
from __future__ import annotations


def kernel_ffn(kernel: str, x, w_gate, w_up, w_down):
    if kernel == "hybrid":
        from sparse_llm.kernels.hybrid import hybrid_ffn

        return hybrid_ffn(x, w_gate, w_up, w_down)
    if kernel == "twell":
        from sparse_llm.kernels.twell import twell_ffn

        return twell_ffn(x, w_gate, w_up, w_down), None, None, None
    raise ValueError(f"unknown sparse FFN kernel {kernel!r}; expected hybrid or twell")
