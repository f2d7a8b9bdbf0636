"""Longest-first token order for the warp-per-token kernels: `longest_first(lengths, threshold)`.

hy_forward / hy_dx (hybrid) and the fused TwELL stage take tokens in this order, so that a long row
starts early instead of finishing alone at the end, and split the first `split` rows (those of at
least `threshold` active units) over several warps. Lengths are compared in buckets (exact below 64,
16 steps per octave above), ties in token order, so the order is deterministic and one counting sort
computes it (kernels/cuda/row_order.cu: two launches, no host sync); `longest_first_reference` is
the same order in PyTorch (CPU, and the check of the kernels).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SOURCE = "row_order.cu"
BUCKETS, CHUNK = 256, 1024  # = RO_BUCKETS, RO_CHUNK in row_order.cu
_NO_THRESHOLD = 2**31 - 1


def length_keys(lengths: Tensor) -> Tensor:
    """row_order.cu's ro_key: 0 for the longest bucket ... BUCKETS - 1 for length 0 (int64)."""
    lengths = lengths.to(torch.int64).clamp_min(0)
    _, bit_length = torch.frexp(lengths.to(torch.float64))  # exact for integers below 2^53
    octave = bit_length.to(torch.int64) - 1
    fine = 64 + (octave - 6) * 16 + ((lengths >> (octave - 4).clamp_min(0)) & 15)
    bucket = torch.where(lengths < 64, lengths, fine).clamp_max(BUCKETS - 1)
    return BUCKETS - 1 - bucket


def longest_first_reference(lengths: Tensor, threshold: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    order = torch.sort(length_keys(lengths), stable=True).indices.to(torch.int32)
    split = None if threshold is None else (lengths >= threshold).sum(dtype=torch.int32)
    return order, split


def kernel_variants() -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of the module `longest_first` compiles (for the warm-up)."""
    return [(SOURCE, {})]


def longest_first(lengths: Tensor, threshold: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(order, split): order (int32 [N]) = the token indices by `lengths` (an int32 [N] tensor, any
    stride), longest first in buckets of 1/16 octave, ties in index order; split = the number of
    tokens with length >= threshold (an int32 device scalar; None without a threshold)."""
    from sparse_llm.kernels.loader import cupy_available

    if lengths.dim() != 1:
        raise ValueError(f"longest_first: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    n = lengths.shape[0]
    if not (lengths.is_cuda and lengths.dtype == torch.int32 and 0 < n < 2**31 - CHUNK and cupy_available()):
        return longest_first_reference(lengths, threshold)
    import numpy as np

    from sparse_llm.kernels.loader import get_kernel, launch, ptr

    dev = lengths.device
    chunks = -(-n // CHUNK)
    hist = torch.empty(chunks, BUCKETS + 1, dtype=torch.int32, device=dev)
    order = torch.empty(n, dtype=torch.int32, device=dev)
    split = torch.empty((), dtype=torch.int32, device=dev)
    stride, limit = np.int64(lengths.stride(0)), np.int32(_NO_THRESHOLD if threshold is None else threshold)
    launch(get_kernel(SOURCE, "ro_count", dev), (chunks,), (CHUNK,),
           (ptr(lengths), stride, np.int32(n), limit, ptr(hist)))
    launch(get_kernel(SOURCE, "ro_scatter", dev), (chunks,), (CHUNK,),
           (ptr(lengths), stride, np.int32(n), ptr(hist), ptr(order), ptr(split)))
    return order, (None if threshold is None else split)
