"""Feed-forward variants: `swiglu` (dense baseline), `relu_gated` (the paper's), `relu` (non-gated).

The ReLU variants return, beside the output, the statistics of their hidden activations h:
the differentiable L1 sum (for the penalty) and the active counts (for telemetry and the kernels'
packed formats). Where h is computed depends on the kernel mode: the pure-PyTorch reference
(`torch`, and every mode on CPU), the TwELL inference kernels (`twell`, forward without grad), or
the hybrid training kernels (`hybrid`, also used without grad). `auto` runs each layer on the kernel
only where its measured active fraction makes the kernel faster (set by sparse_llm.train.routing).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparse_llm.kernels.reference import activation_stats, ffn_hidden


class FFNStats(NamedTuple):
    l1_sum: torch.Tensor        # float32 scalar: sum of |h| over the call's tokens (differentiable)
    tile_counts: torch.Tensor   # int32 [tokens, ceil(d_ff / 256)]: active units per token per tile
    neuron_counts: torch.Tensor  # int32 [d_ff]: tokens on which each unit fired


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, kernel: str = "torch"):
        super().__init__()
        self.kind = kind
        self.kernel = kernel
        # kernel=auto: set per layer from the measured active fraction (sparse_llm.train.routing)
        self.route_training = False
        self.route_inference = False
        self.gate = nn.Linear(d_model, d_ff, bias=False) if kind != "relu" else None
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[FFNStats]]:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x)), None
        x2d = x.reshape(-1, x.shape[-1])
        y2d, stats = self._sparse_forward(x2d)
        return y2d.view_as(x), stats

    def _weights(self, dtype: torch.dtype):
        cast = lambda layer: None if layer is None else layer.weight.to(dtype)  # noqa: E731
        return cast(self.gate), cast(self.up), cast(self.down)

    def kernel_for_call(self, x: torch.Tensor) -> Optional[str]:
        """The CUDA kernel this call runs (`hybrid`, `twell`), or None for the PyTorch reference."""
        if not x.is_cuda or self.kernel == "torch":
            return None
        training = torch.is_grad_enabled()
        if self.kernel == "hybrid":
            return "hybrid"
        if self.kernel == "twell":
            return None if training else "twell"
        if training:
            return "hybrid" if self.route_training else None
        return "twell" if self.route_inference else None

    def _sparse_forward(self, x2d: torch.Tensor) -> tuple[torch.Tensor, Optional[FFNStats]]:
        kernel = self.kernel_for_call(x2d)
        if kernel is not None:
            from sparse_llm.kernels.dispatch import kernel_ffn

            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x2d.dtype
            with torch.autocast("cuda", enabled=False):
                y, *stats = kernel_ffn(kernel, x2d.to(dtype), *self._weights(dtype))
            return y, None if stats[0] is None else FFNStats(*stats)
        w_gate = None if self.gate is None else self.gate.weight
        h = ffn_hidden(x2d, w_gate, self.up.weight)
        return self.down(h), FFNStats(*activation_stats(h))
