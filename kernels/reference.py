"""Pure-PyTorch semantics of the sparse FFN: the test oracle for every kernel and the CPU path.

Weights keep nn.Linear's layout: w_gate and w_up are [d_ff, d_model], w_down is [d_model, d_ff].
`w_gate is None` means the non-gated variant h = ReLU(x W_up^T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STATS_TILE = 256  # width of the column tiles whose per-token active counts size the packed formats


def ffn_hidden(x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor) -> torch.Tensor:
    """h = ReLU(x Wg^T) * (x Wu^T), or ReLU(x Wu^T) without a gate."""
    if w_gate is None:
        return F.relu(F.linear(x, w_up))
    return F.relu(F.linear(x, w_gate)) * F.linear(x, w_up)


def ffn_reference(x, w_gate, w_up, w_down) -> torch.Tensor:
    return F.linear(ffn_hidden(x, w_gate, w_up), w_down)


def ffn_reference_fp32(x, w_gate, w_up, w_down) -> torch.Tensor:
    """The float32 oracle the kernels are checked against (inputs upcast, result in float32)."""
    f32 = [None if t is None else t.float() for t in (x, w_gate, w_up, w_down)]
    return ffn_reference(*f32)


def activation_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics every FFN path reports, from hidden activations h [N, d_ff].

    Returns (l1_sum: float32 (float64 for float64 h) scalar = sum |h| (differentiable), tile_counts: int32 [N, ceil(d_ff/256)]
    active units per token in each 256-wide column tile, neuron_counts: int32 [d_ff] tokens on which
    each unit fired). Active means h != 0.
    """
    h2 = h.reshape(-1, h.shape[-1])
    n, d_ff = h2.shape
    l1_sum = h2.abs().sum(dtype=torch.promote_types(h2.dtype, torch.float32))
    active = h2.detach() != 0
    tiles = -(-d_ff // STATS_TILE)
    padded = F.pad(active, (0, tiles * STATS_TILE - d_ff))
    tile_counts = padded.view(n, tiles, STATS_TILE).sum(-1, dtype=torch.int32)
    neuron_counts = active.sum(0, dtype=torch.int32)
    return l1_sum, tile_counts, neuron_counts
