"""Pure-PyTorch hybrid format (ELL rows of width W + dense backup rows) and every FFN product
computed from it: the CPU path of `sparse_llm::hybrid_ffn_*`, the oracle of the CUDA kernels and
the fallback on CUDA for shapes the kernels do not take. No host synchronisation anywhere (no
`.item()`, no `nonzero`): every shape depends only on (N, d_model, d_ff, W).

The format of a layer's hidden activations, saved by the forward for the backward:
  mrow    int32 [N, ceil(d_ff/32)]  row bitmask of the active pairs (g > 0), bit j%32 of word j//32.
                                    It is the dense backup: every row, past W or not, is exact here.
  tprefix int32 [N, ceil(d_ff/256)] active count of the row before each 256-wide tile, so that the
                                    rank of (t, j) = tprefix[t, j//256] + popcounts inside the tile.
  ell     float32 [N, W, 2]         (a, u) of the row's first W active pairs in column order
                                    (a = ReLU(g) as the gate GEMM rounded it, u = x_t . Wu_j in
                                    float32; u = 0 in the non-gated variant, where h = a). Slots past
                                    the row's count are zero. (float64 for float64 inputs.)
A pair of rank >= W (a row past the ELL width) has no stored values: products recompute a and u
from x and the weights in float32 (the kernels stream those rows anyway). Nothing is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_llm.kernels.reference import STATS_TILE, activation_stats


def words(d_ff: int) -> int:
    return -(-d_ff // 32)


def tiles(d_ff: int) -> int:
    return -(-d_ff // STATS_TILE)


def pack_bits(active: torch.Tensor) -> torch.Tensor:
    """bool [N, F] -> int32 [N, ceil(F/32)], bit b of word w = active[:, 32w + b]."""
    n, f = active.shape
    nw = words(f)
    padded = F.pad(active.to(torch.int64), (0, nw * 32 - f)).view(n, nw, 32)
    shifts = torch.arange(32, device=active.device, dtype=torch.int64)
    v = (padded << shifts).sum(-1)
    v = torch.where(v >= 2**31, v - 2**32, v)
    return v.to(torch.int32)


def unpack_bits(bits: torch.Tensor, d_ff: int) -> torch.Tensor:
    """int32 [N, nw] -> bool [N, d_ff] (inverse of pack_bits)."""
    n = bits.shape[0]
    v = bits.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    return ((v.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, -1)[:, :d_ff]


def ranks(active: torch.Tensor) -> torch.Tensor:
    """int64 [N, F]: number of active columns before each column in its row."""
    return torch.cumsum(active.to(torch.int64), dim=1) - active.to(torch.int64)


def tile_prefix(active: torch.Tensor) -> torch.Tensor:
    n, f = active.shape
    nt = tiles(f)
    counts = F.pad(active.to(torch.int32), (0, nt * STATS_TILE - f)).view(n, nt, STATS_TILE).sum(-1)
    return (torch.cumsum(counts, dim=1) - counts).to(torch.int32)


def rank_from_format(mrow: torch.Tensor, tprefix: torch.Tensor, t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Rank of pairs (t, j) as the kernels compute it: tprefix + popcounts of the words before j in
    its tile + the bits below j in its word. t, j: int64 [P]."""
    v = mrow.to(torch.int64) & 0xFFFFFFFF
    row = v[t]  # [P, nw]
    nw = row.shape[1]
    widx = torch.arange(nw, device=mrow.device)
    w = j // 32
    in_tile_before = (widx >= (j // STATS_TILE * (STATS_TILE // 32)).unsqueeze(1)) & (widx < w.unsqueeze(1))
    shifts = torch.arange(32, device=mrow.device, dtype=torch.int64)
    bits = (row.unsqueeze(-1) >> shifts) & 1  # [P, nw, 32]
    before = (bits.sum(-1) * in_tile_before).sum(-1)
    own = (bits[torch.arange(len(t), device=mrow.device), w] * (shifts < (j % 32).unsqueeze(1))).sum(-1)
    return tprefix[t, j // STATS_TILE].to(torch.int64) + before + own


def to_ell(active: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """values [N, F, C] at active pairs -> [N, W, C]: the row's first W active values, in column order."""
    n, f, c = values.shape
    rank = ranks(active)
    keep = active & (rank < width)
    slot = torch.where(keep, rank, torch.full_like(rank, width))
    out = torch.zeros(n, width + 1, c, dtype=values.dtype, device=values.device)
    out.scatter_(1, slot.unsqueeze(-1).expand(n, f, c), torch.where(keep.unsqueeze(-1), values, 0))
    return out[:, :width].contiguous()


def from_ell(ell: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, W, C] -> (values [N, F, C] at pairs of rank < W, zero elsewhere; mask of those pairs)."""
    n, width, c = ell.shape
    f = active.shape[1]
    rank = ranks(active)
    keep = active & (rank < width)
    slot = torch.where(keep, rank, torch.zeros_like(rank))
    vals = ell.gather(1, slot.unsqueeze(-1).expand(n, f, c))
    return torch.where(keep.unsqueeze(-1), vals, 0), keep


def pack(g: torch.Tensor, u: torch.Tensor | None, width: int):
    """Gate pre-activations g [N, F] (and up products u, float32, or None) -> (mrow, tprefix, ell)."""
    active = g > 0
    acc = acc_dtype(g.dtype)
    a = torch.where(active, g.to(acc), 0)
    uu = torch.zeros_like(a) if u is None else torch.where(active, u.to(acc), 0)
    return pack_bits(active), tile_prefix(active), to_ell(active, torch.stack([a, uu], -1), width)


def unpack(mrow: torch.Tensor, ell: torch.Tensor, d_ff: int):
    """-> (active bool [N, F], a [N, F], u [N, F], stored mask [N, F]); a and u are zero at pairs of
    rank >= W (those come from the dense backup: the bitmask plus recomputation)."""
    active = unpack_bits(mrow, d_ff)
    vals, keep = from_ell(ell, active)
    return active, vals[..., 0], vals[..., 1], keep


# ----------------------------------------------------------------------------------------------
# products


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / format dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def gate_preact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g = x W^T in x's dtype: the one dense GEMM, computed as the CUDA path computes it, so that the
    reference and the kernels see bit-identical gate values: torch.mm, or on Hopper the TwELL gate
    kernel that the op's forward runs (`hybrid.fused_gate_supported`), with every tile written."""
    from sparse_llm.kernels import hybrid

    if hybrid.fused_gate_supported(x, w):
        from sparse_llm.kernels.twell import twell_gate_pack

        return twell_gate_pack(hybrid._c(x), hybrid._c(w), hybrid.GATE_SLOTS, write_all=True)[0]
    return torch.mm(x, w.t())


def forward(x, w_gate, w_up, w_down, width: int):
    """The op's forward on the format. Returns (y, l1_sum, tile_counts, neuron_counts, mrow, tprefix, ell).

    g is computed in x's dtype (as the gate GEMM does), u, h, y in float32 (float64 for float64
    inputs), y rounded to x's dtype.
    """
    gated = w_gate is not None
    acc = acc_dtype(x.dtype)
    g = gate_preact(x, w_gate if gated else w_up)
    active = g > 0
    a = torch.where(active, g.to(acc), 0)
    if gated:
        u = torch.where(active, x.to(acc) @ w_up.to(acc).t(), 0)
        h = a * u
    else:
        u = None
        h = a
    y = (h @ w_down.to(acc).t()).to(x.dtype)
    l1_sum, tile_counts, neuron_counts = activation_stats(h)
    mrow, tprefix, ell = pack(g, u, width)
    return y, l1_sum, tile_counts, neuron_counts, mrow, tprefix, ell


def backward(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix, ell):
    """All gradients from the format. dy [N, D], dl1 float32 scalar (gradient of l1_sum).

    Returns (dx, dw_gate or None, dw_up, dw_down) in the dtypes of their primals.
    """
    gated = w_gate is not None
    d_ff = w_up.shape[0]
    active, a_s, u_s, keep = unpack(mrow, ell, d_ff)
    acc = acc_dtype(x.dtype)
    x32, dy32 = x.to(acc), dy.to(acc)
    wg32 = (w_gate if gated else w_up).to(acc)
    g32 = x32 @ wg32.t()
    a = torch.where(keep, a_s, torch.where(active, g32.clamp_min(0), 0))
    if gated:
        wu32 = w_up.to(acc)
        u = torch.where(keep, u_s, torch.where(active, x32 @ wu32.t(), 0))
        h = a * u
    else:
        h = a
    dh = torch.where(active, dy32 @ w_down.to(acc), 0) + dl1.to(acc) * torch.sign(h)
    # ReLU's derivative is the format's pattern (the gate GEMM's sign in x's dtype), also where a
    # recomputed float32 pre-activation rounds to <= 0: as bf16 autograd differentiates its own gate
    pos = active
    dw_down = (dy32.t() @ h).to(w_down.dtype)
    if gated:
        du = dh * a
        dg = torch.where(pos, dh * u, 0)
        dx = (dg @ wg32 + du @ wu32).to(x.dtype)
        return dx, (dg.t() @ x32).to(w_gate.dtype), (du.t() @ x32).to(w_up.dtype), dw_down
    dg = torch.where(pos, dh, 0)
    dx = (dg @ wg32).to(x.dtype)
    return dx, None, (dg.t() @ x32).to(w_up.dtype), dw_down
