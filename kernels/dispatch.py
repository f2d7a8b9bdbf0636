"""Routes a sparse FFN call to a CUDA kernel, or returns None to let the caller run the reference.

`kernel_ffn(mode, x, w_gate, w_up, w_down)` is called by sparse_llm.model.ffn on CUDA tensors with
mode `twell` (inference kernels, used only where no gradient is needed), `hybrid` (training kernels,
forward and backward) or `auto`. It returns (y, l1_sum, tile_counts, neuron_counts), or
(y, None, None, None) where the kernel computes no statistics, or None for the reference path.
"""
from __future__ import annotations

import torch


def kernel_ffn(mode: str, x, w_gate, w_up, w_down):
    if mode == "hybrid":
        from sparse_llm.kernels.hybrid import hybrid_ffn

        return hybrid_ffn(x, w_gate, w_up, w_down)
    if mode == "twell":
        if torch.is_grad_enabled():
            return None
        from sparse_llm.kernels.twell import twell_ffn

        return twell_ffn(x, w_gate, w_up, w_down), None, None, None
    if mode == "auto":
        raise NotImplementedError("kernel=auto is not available yet: use kernel=torch, twell or hybrid")
    raise ValueError(f"kernel={mode!r} is not one of torch, twell, hybrid, auto")
