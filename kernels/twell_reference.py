"""Pure-PyTorch TwELL (tile-wise ELLPACK): pack, unpack, overflow accounting, and the FFN computed
through the format. The CPU oracle of what kernels/cuda/twell_pack.cu and twell_ffn.cu compute.

Format of a gate matrix G [N, d_ff] (pre-ReLU) with column tiles of `tile` columns and `slots` slots:
  counts [N, nt] int32     true number of columns c of the tile with G[n, c] > 0 (nt = ceil(d_ff / tile))
  slots  [N, nt, S] int32  (bits(G[n, c]) << 16) | (c - k * tile) for the first min(count, S) active
                           columns c of tile k, in ascending c; bits() is the raw 16-bit pattern of the
                           bf16 / fp16 value (always positive, so the int32 is non-negative)
A tile whose count exceeds S *overflows*: its slots are incomplete and the consumer takes that tile
from the dense backup row (G itself) instead, so the result is exact. stats = [number of overflowing
(row, tile) pairs, number of active entries inside them].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TILE = 256
DEFAULT_SLOTS = 32
PACKED_DTYPES = (torch.bfloat16, torch.float16)


def num_tiles(d_ff: int, tile: int) -> int:
    return -(-d_ff // tile)


@dataclass
class TwellPacked:
    counts: torch.Tensor  # int32 [N, nt]
    slots: torch.Tensor  # int32 [N, nt, S]
    d_ff: int
    tile: int
    dtype: torch.dtype

    @property
    def n_slots(self) -> int:
        return self.slots.shape[-1]

    @property
    def overflow(self) -> torch.Tensor:
        """bool [N, nt]: tiles computed from the dense backup."""
        return self.counts > self.n_slots

    def stats(self) -> torch.Tensor:
        """int32 [2]: (overflowing tiles, active entries in them), as the pack kernel counts them."""
        ovf = self.overflow
        return torch.stack([ovf.sum(), self.counts[ovf].sum()]).to(torch.int32)

    def valid_mask(self) -> torch.Tensor:
        """bool [N, nt, S]: the slots that hold entries (those the kernels write and read)."""
        s = torch.arange(self.n_slots, device=self.counts.device)
        return (s < self.counts.clamp(max=self.n_slots)[..., None]) & ~self.overflow[..., None]


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Raw 16-bit patterns of a bf16/fp16 tensor as int32 in [0, 65535]."""
    if values.dtype not in PACKED_DTYPES:
        raise TypeError(f"TwELL packs bfloat16 or float16 values, got {values.dtype}")
    return values.view(torch.int16).to(torch.int32) & 0xFFFF


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = bits.to(torch.int32)
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)


def pack_twell(gate: torch.Tensor, tile: int = DEFAULT_TILE, slots: int = DEFAULT_SLOTS) -> TwellPacked:
    """ReLU + TwELL pack of a dense gate matrix [N, d_ff] (pre-activation, bf16 or fp16)."""
    if gate.dim() != 2:
        raise ValueError(f"gate must be [N, d_ff], got shape {tuple(gate.shape)}")
    n, d_ff = gate.shape
    nt = num_tiles(d_ff, tile)
    padded = torch.nn.functional.pad(gate, (0, nt * tile - d_ff)).view(n, nt, tile)
    active = padded > 0  # NaN is not active (as in the kernels)
    counts = active.sum(-1, dtype=torch.int32)
    rank = active.to(torch.int32).cumsum(-1) - 1
    keep = active & (rank < slots)
    local = torch.arange(tile, dtype=torch.int32, device=gate.device).expand(n, nt, tile)
    entry = (_bits(padded) << 16) | local
    out = torch.zeros(n, nt, slots, dtype=torch.int32, device=gate.device)
    nn_, kk, cc = keep.nonzero(as_tuple=True)
    out[nn_, kk, rank[nn_, kk, cc]] = entry[nn_, kk, cc]
    return TwellPacked(counts, out, d_ff, tile, gate.dtype)


def unpack_twell(packed: TwellPacked, dense_backup: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU(G) [N, d_ff] rebuilt from the packed slots, and from `dense_backup` (G) for overflowing
    tiles (which must then be given if any tile overflows)."""
    n, nt = packed.counts.shape
    tile = packed.tile
    out = torch.zeros(n, nt, tile, dtype=packed.dtype, device=packed.counts.device)
    valid = packed.valid_mask()
    nn_, kk, ss = valid.nonzero(as_tuple=True)
    entry = packed.slots[nn_, kk, ss]
    out[nn_, kk, entry & 0xFFFF] = _from_bits(entry >> 16, packed.dtype)
    ovf = packed.overflow
    if bool(ovf.any()):
        if dense_backup is None:
            raise ValueError("tiles overflow their slots: the dense backup (the gate matrix) is needed")
        padded = torch.nn.functional.pad(dense_backup, (0, nt * tile - packed.d_ff)).view(n, nt, tile)
        out = torch.where(ovf[..., None], torch.relu(padded), out)
    return out.view(n, nt * tile)[:, : packed.d_ff]


def twell_ffn_reference(x, w_gate, w_up, w_down, tile: int = DEFAULT_TILE, slots: int = DEFAULT_SLOTS):
    """The FFN computed the way the kernels do: gate GEMM rounded to the input dtype, TwELL pack (dense
    backup for overflowing tiles), then h = g * (x Wu^T) (or h = g without a gate) and y = h Wd^T in
    float32. Returns (y float32 [..., d_model], stats int32 [2])."""
    d_model = x.shape[-1]
    x2 = x.reshape(-1, d_model)
    gate_w = w_up if w_gate is None else w_gate
    gate = (x2.float() @ gate_w.float().t()).to(x.dtype)
    packed = pack_twell(gate, tile, slots)
    g = unpack_twell(packed, gate).float()
    h = g if w_gate is None else g * (x2.float() @ w_up.float().t())
    y = h @ w_down.float().t()
    return y.reshape(*x.shape[:-1], w_down.shape[0]), packed.stats()
