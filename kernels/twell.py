"""TwELL inference FFN: gate GEMM -> ReLU + TwELL pack -> fused sparse up / gating / down.

    y = twell_ffn(x, w_gate, w_up, w_down)          # x [..., d_model]; w_gate may be None (non-gated)

Pipeline on CUDA (all on torch.cuda.current_stream(), no host synchronization, CUDA-graph capturable):
 1. G = x W_gate^T by cuBLAS (torch.matmul), in the input dtype. Non-gated: G = x W_up^T.
 2. kernels/cuda/twell_pack.cu: ReLU + TwELL pack of G (per row and tile of `tile` columns: the true
    active count and up to `slots` (bits(value) << 16 | column) entries) and the overflow statistics.
 3. kernels/cuda/twell_ffn.cu: per token, walk the active (neuron, g) pairs: u = x . Wu[j],
    h = g * u, y += h * Wd^T[j]; a tile whose count exceeds `slots` is read from G instead (exact).
Weights keep nn.Linear layout; the down weight is used transposed ([d_ff, d_model], rows contiguous):
pass `w_down_t=w_down.t().contiguous()` (cache it) to skip the transpose per call.

Exposed as the custom op ``torch.ops.sparse_llm.twell_ffn`` (with a fake implementation for
torch.compile / meta tensors, and a CPU implementation that follows twell_reference.py).
Compiled modules are cached in-process and on disk by CuPy (``$CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from sparse_llm.kernels import twell_reference as _ref
from sparse_llm.kernels.twell_reference import DEFAULT_SLOTS, DEFAULT_TILE, num_tiles

MAX_SLOTS = 64
MAX_D_FF = 65536  # neuron indices travel in 16 bits


@dataclass(frozen=True)
class FusedConfig:
    """Launch configuration of the TwELL pipeline (see kernels/README.md and NOTES_twell.md)."""

    slice_width: int = 1024  # d_model columns per warp; warps per token = d_model / slice_width
    group: int = 1  # (neuron) pairs walked together per step
    regs: int = 128  # register cap per thread (sets __launch_bounds__ min blocks)
    hints: int = 1  # L2 evict_last on weight rows, evict_first on activations
    scan: int = 0  # 1: ignore the packed form, scan the dense gate rows (comparison variant)
    prefetch: int = 1  # issue the Wd^T row loads together with the Wu row loads
    pack_unroll: int = 4  # (row, tile) tasks per warp in the pack kernel, loads issued together
    grid_fill: float = 1.0  # fraction of the resident blocks the persistent fused grid uses
    passes: int = 0  # neuron passes of the fused stage (0: enough for each pass's rows to fit L2)
    pass_l2_factor: float = 1.0  # auto passes: weight bytes per pass <= factor x L2 size
    lpt: int = 1  # walk tokens longest-first (per-token active totals from the pack, argsort on device)

    def team(self, d_model: int) -> int:
        team = 1
        while d_model // team > self.slice_width and team < 8 and d_model % (16 * team) == 0:
            team *= 2
        return team

    def block(self, d_model: int) -> int:
        return 32 * max(4, self.team(d_model))


# Chosen by the sweep in bench_inference (`--sweep`); see NOTES_twell.md for the measured table.
DEFAULT_CONFIG = FusedConfig()
_config_override: Optional[FusedConfig] = None


def set_default_config(config: Optional[FusedConfig]) -> None:
    """Override the launch configuration used by twell_ffn (None restores DEFAULT_CONFIG)."""
    global _config_override
    _config_override = config


def current_config() -> FusedConfig:
    return _config_override or DEFAULT_CONFIG


# ---------------------------------------------------------------------------------------------
# Dispatch threshold: measured, not guessed.
# MEASURED_CROSSOVER[(d_model, d_ff)] is the mean active fraction (active units per
# token / d_ff) at which TwELL's time equals dense eager PyTorch's, from a linear fit of TwELL time vs.
# mean active count over the 99.5 / 98.9 / 98 / 95 % levels of `python -m sparse_llm.kernels.bench
# inference` (131072 tokens, bf16). Source of each number: NOTES_twell.md (device, date).
MEASURED_CROSSOVER: dict[tuple[int, int], float] = {
    # H100 80GB HBM3 (nvidia-h100-x1), bf16, 131072 tokens, 2026-11-24: kernels/results/bench_v3_h100.log
    (2048, 5632): 0.01276,  # 71.9 active / token
    (2048, 8192): 0.01221,  # 100.0
    (4096, 11008): 0.00976,  # 107.4 (4 neuron passes: the weights are 3.4x L2)
    (1024, 2816): 0.01503,  # 42.3
}
# Used only if the table above is empty: DESIGN.md section 6's estimate (~60 active / 5632).
FALLBACK_CROSSOVER = 0.0100


def crossover_active_fraction(d_model: int, d_ff: int) -> float:
    if (d_model, d_ff) in MEASURED_CROSSOVER:
        return MEASURED_CROSSOVER[(d_model, d_ff)]
    if MEASURED_CROSSOVER:
        # the crossover is roughly shape-independent (gate GEMM and gather both scale with d_model);
        # take the closest measured d_model, conservatively the smallest value among ties
        best = min(MEASURED_CROSSOVER, key=lambda s: (abs(math.log2(s[0] / d_model)), MEASURED_CROSSOVER[s]))
        return MEASURED_CROSSOVER[best]
    return FALLBACK_CROSSOVER


# Below this much work (tokens x d_model x d_ff) the pipeline's ~8 launches (~0.1-0.15 ms of host
# time outside a CUDA graph) dominate: 1024x2816 at 16384 tokens (4.7e10) ran 0.48 ms vs 0.55 dense
# at 99.5% and lost from 98.9% on, while 2048x5632 at 16384 tokens (1.9e11) kept 1.52x
# (kernels/results/bench_v3_h100_16k.log).
MIN_WORK_FOR_TWELL = 1.0e11


def twell_is_faster(active_fraction: float, d_model: int, d_ff: int, tokens: Optional[int] = None) -> bool:
    """True when TwELL inference is expected to beat dense eager PyTorch at this mean active fraction
    (and, if `tokens` is given, this problem size). Take a safety margin in the caller if the fraction
    is noisy (dispatch to dense near the line)."""
    if tokens is not None and tokens * d_model * d_ff < MIN_WORK_FOR_TWELL:
        return False
    return active_fraction < crossover_active_fraction(d_model, d_ff)


# ---------------------------------------------------------------------------------------------
# Launchers
def _dtype_code(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return 0
    if dtype == torch.float16:
        return 1
    raise TypeError(f"TwELL kernels take bfloat16 or float16, got {dtype}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_shapes(x_last: int, w_gate, w_up, w_down_t, tile: int, slots: int) -> tuple[int, int]:
    d_ff, d_model = w_up.shape
    if x_last != d_model:
        raise ValueError(f"x has {x_last} features but w_up is [{d_ff}, {d_model}]")
    if w_gate is not None and tuple(w_gate.shape) != (d_ff, d_model):
        raise ValueError(f"w_gate must be [{d_ff}, {d_model}] like w_up, got {tuple(w_gate.shape)}")
    if tuple(w_down_t.shape) != (d_ff, d_model):
        raise ValueError(f"w_down_t must be [d_ff, d_model] = [{d_ff}, {d_model}], got {tuple(w_down_t.shape)}"
                         " (pass w_down [d_model, d_ff] to twell_ffn, or w_down.t().contiguous())")
    if d_model % 64 or d_ff % 64:
        raise ValueError(f"d_model and d_ff must be multiples of 64, got {d_model} and {d_ff}")
    if d_ff > MAX_D_FF:
        raise ValueError(f"d_ff must be at most {MAX_D_FF}, got {d_ff}")
    if tile % 256 or not 256 <= tile <= 65536:
        raise ValueError(f"tile must be a multiple of 256 in [256, 65536], got {tile}")
    if not 1 <= slots <= min(MAX_SLOTS, tile):
        raise ValueError(f"slots must be in [1, {min(MAX_SLOTS, tile)}], got {slots}")
    return d_model, d_ff


def fused_defines(d_model: int, tile: int, slots: int, gated: bool, dtype: torch.dtype,
                  config: Optional[FusedConfig] = None) -> dict[str, int]:
    """The -D defines twell_ffn.cu is compiled with for this problem and launch configuration."""
    cfg = config or current_config()
    block = cfg.block(d_model)
    return dict(TW_DMODEL=d_model, TW_TILE=tile, TW_SLOTS=slots, TW_GATED=int(gated), TW_DTYPE=_dtype_code(dtype),
                TW_TEAM=cfg.team(d_model), TW_BLOCK=block, TW_MINB=max(1, 65536 // (block * cfg.regs)),
                TW_GROUP=cfg.group, TW_HINTS=cfg.hints, TW_SCAN=cfg.scan, TW_PREFETCH=cfg.prefetch)


def kernel_variants(d_model: int, d_ff: int, gated: bool, dtype: torch.dtype) -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of the modules an inference forward of this FFN shape compiles with the
    default tile, slots and launch configuration (for the ahead-of-time warm-up)."""
    _check_shapes(d_model, torch.empty(d_ff, d_model, device="meta") if gated else None,
                  torch.empty(d_ff, d_model, device="meta"), torch.empty(d_ff, d_model, device="meta"),
                  DEFAULT_TILE, DEFAULT_SLOTS)
    return [("twell_pack.cu", pack_defines(DEFAULT_TILE, DEFAULT_SLOTS, dtype, current_config().pack_unroll)),
            ("twell_ffn.cu", fused_defines(d_model, DEFAULT_TILE, DEFAULT_SLOTS, gated, dtype))]


def pack_defines(tile: int, slots: int, dtype: torch.dtype, unroll: int = 4) -> dict[str, int]:
    return dict(TW_TILE=tile, TW_SLOTS=slots, TW_DTYPE=_dtype_code(dtype), TW_PACK_UNR=unroll)


def _resident_blocks(kernel, block: int, minb: int) -> int:
    """Blocks of `kernel` one SM holds at once (registers, shared memory, threads)."""
    try:
        regs = int(kernel.num_regs)
        smem = int(kernel.shared_size_bytes)
    except (AttributeError, TypeError, ValueError):
        return minb
    warps = block // 32
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, regs_per_warp * warps)
    by_smem = (228 * 1024) // (smem + 1024)
    return max(1, min(by_regs, by_smem, 2048 // block, 32))


def twell_pack(gate: torch.Tensor, tile: int = DEFAULT_TILE, slots: int = DEFAULT_SLOTS, *,
               counts: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None,
               stats: Optional[torch.Tensor] = None, unroll: Optional[int] = None,
               row_total: Optional[torch.Tensor] = None):
    """ReLU + TwELL pack of G [N, d_ff] on CUDA. Returns (counts int32 [N, nt], slots int32
    [N, nt, slots], stats int32 [2]) in the layout of twell_reference.pack_twell (slots past a tile's
    count are left unwritten). Output buffers may be given (stats is accumulated into); `row_total`
    (int32 [N], zeroed by the caller) receives each row's total active count."""
    from sparse_llm.kernels.loader import get_kernel, launch, ptr

    gate = _aligned(gate)
    n, d_ff = gate.shape
    if d_ff % 8:
        raise ValueError(f"d_ff must be a multiple of 8, got {d_ff}")
    nt = num_tiles(d_ff, tile)
    if counts is None:
        counts = torch.empty(n, nt, dtype=torch.int32, device=gate.device)
    if packed is None:
        packed = torch.empty(n, nt, slots, dtype=torch.int32, device=gate.device)
    if stats is None:
        stats = torch.zeros(2, dtype=torch.int32, device=gate.device)
    if n == 0:
        return counts, packed, stats
    defines = pack_defines(tile, slots, gate.dtype, unroll or current_config().pack_unroll)
    kernel = get_kernel("twell_pack.cu", "twell_pack", gate.device, **defines)
    grid = (-(-(n * nt) // (8 * defines["TW_PACK_UNR"])),)
    launch(kernel, grid, (256,), (ptr(gate), ptr(counts), ptr(packed), ptr(stats), ptr(row_total), np.int32(n),
                                  np.int32(d_ff)))
    return counts, packed, stats


def num_passes(d_model: int, d_ff: int, gated: bool, device: torch.device, config: Optional[FusedConfig] = None) -> int:
    """Neuron passes of the fused stage: enough that each pass's weight rows stay L2-resident."""
    cfg = config or current_config()
    if cfg.passes > 0:
        return cfg.passes
    from sparse_llm.kernels.loader import device_properties

    l2 = device_properties(device).L2_cache_size
    weight_bytes = (2 if gated else 1) * d_ff * d_model * 2
    return max(1, math.ceil(weight_bytes / (cfg.pass_l2_factor * l2)))


def twell_ffn_packed(x2d: torch.Tensor, gate: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor,
                     w_up: Optional[torch.Tensor], w_down_t: torch.Tensor, tile: int = DEFAULT_TILE,
                     out: Optional[torch.Tensor] = None, config: Optional[FusedConfig] = None,
                     order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused sparse stage: y [N, d_model] from x [N, d_model], the dense gate G [N, d_ff] (read
    only for overflowing tiles) and its TwELL form. `w_up=None` is the non-gated FFN (h = ReLU(G)).
    `order` (int32 [N], a permutation of the tokens) is the order in which tokens are taken."""
    from sparse_llm.kernels.loader import device_properties, get_kernel, launch, ptr

    cfg = config or current_config()
    n, d_model = x2d.shape
    d_ff = gate.shape[1]
    slots = packed.shape[-1]
    y = out if out is not None else torch.empty_like(x2d)
    if n == 0:
        return y
    defines = fused_defines(d_model, tile, slots, w_up is not None, x2d.dtype, cfg)
    kernel = get_kernel("twell_ffn.cu", "twell_ffn_fused", x2d.device, **defines)
    block = defines["TW_BLOCK"]
    tokens_per_block = block // 32 // defines["TW_TEAM"]
    sms = device_properties(x2d.device).multi_processor_count
    resident = _resident_blocks(kernel, block, defines["TW_MINB"])
    grid = (max(1, min(-(-n // tokens_per_block), int(sms * resident * cfg.grid_fill))),)
    nt = num_tiles(d_ff, tile)
    passes = min(num_passes(d_model, d_ff, w_up is not None, x2d.device, cfg), nt)
    per_pass = -(-nt // passes)
    passes = -(-nt // per_pass)
    work = torch.zeros(passes, dtype=torch.int32, device=x2d.device)
    y_acc = torch.empty(n, d_model, dtype=torch.float32, device=x2d.device) if passes > 1 else None
    for p in range(passes):
        flags = (1 if p > 0 else 0) | (2 if p < passes - 1 else 0)
        args = (ptr(x2d), ptr(gate), ptr(counts), ptr(packed), ptr(w_up), ptr(w_down_t), ptr(y), ptr(y_acc),
                np.uint64(work.data_ptr() + 4 * p), ptr(order), np.int32(n), np.int32(d_ff), np.int32(p * per_pass),
                np.int32(min(nt, (p + 1) * per_pass)), np.int32(flags))
        launch(kernel, grid, (block,), args)
    return y


def _twell_ffn_cuda(x, w_gate, w_up, w_down_t, tile, slots):
    d_model = x.shape[-1]
    x2 = _aligned(x.reshape(-1, d_model))
    w_up = _aligned(w_up)
    w_down_t = _aligned(w_down_t)
    gate_w = w_up if w_gate is None else _aligned(w_gate)
    gate = torch.matmul(x2, gate_w.t())
    cfg = current_config()
    if cfg.scan:
        nt = num_tiles(gate.shape[1], tile)
        # the scan variant reads no packed form (and so has no overflow to count)
        counts = torch.empty(0, nt, dtype=torch.int32, device=x.device)
        packed = torch.empty(0, nt, slots, dtype=torch.int32, device=x.device)
        stats = torch.zeros(2, dtype=torch.int32, device=x.device)
        y = twell_ffn_packed(x2, gate, counts, packed, None if w_gate is None else w_up, w_down_t, tile, config=cfg)
        return y.view(*x.shape[:-1], d_model), stats
    row_total = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device) if cfg.lpt else None
    counts, packed, stats = twell_pack(gate, tile, slots, row_total=row_total)
    # longest-first order: heavy tokens start first, so none of them finishes alone at the end
    order = torch.argsort(row_total, descending=True).to(torch.int32) if cfg.lpt else None
    y = twell_ffn_packed(x2, gate, counts, packed, None if w_gate is None else w_up, w_down_t, tile, config=cfg,
                         order=order)
    return y.view(*x.shape[:-1], d_model), stats


@torch.library.custom_op("sparse_llm::twell_ffn", mutates_args=())
def twell_ffn_op(x: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down_t: torch.Tensor,
                 tile: int, slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [..., d_model], stats int32 [2] = (overflowing tiles, active entries in them))."""
    _check_shapes(x.shape[-1], w_gate, w_up, w_down_t, tile, slots)
    if x.is_cuda:
        _dtype_code(x.dtype)
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
            if w is not None and (w.dtype != x.dtype or w.device != x.device):
                raise ValueError(f"{name} is {w.dtype} on {w.device}; x is {x.dtype} on {x.device}: they must match")
        return _twell_ffn_cuda(x, w_gate, w_up, w_down_t, tile, slots)
    y, stats = _ref.twell_ffn_reference(x, w_gate, w_up, w_down_t.t(), tile, slots)
    return y.to(x.dtype), stats


@twell_ffn_op.register_fake
def _twell_ffn_fake(x, w_gate, w_up, w_down_t, tile, slots):
    _check_shapes(x.shape[-1], w_gate, w_up, w_down_t, tile, slots)
    return x.new_empty(x.shape), x.new_empty((2,), dtype=torch.int32)


def twell_ffn(x: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: Optional[torch.Tensor],
              *, w_down_t: Optional[torch.Tensor] = None, tile: int = DEFAULT_TILE, slots: int = DEFAULT_SLOTS,
              return_stats: bool = False):
    """y = (ReLU(x Wg^T) * (x Wu^T)) Wd^T, or ReLU(x Wu^T) Wd^T when w_gate is None, through TwELL.

    x [..., d_model] bf16/fp16; w_gate, w_up [d_ff, d_model]; w_down [d_model, d_ff] (nn.Linear
    layouts). `w_down_t` (= w_down.t().contiguous(), [d_ff, d_model]) may be given instead of / with
    w_down to skip the transpose. `tile` (multiple of 256) and `slots` (<= 64) set the packed format;
    tiles with more than `slots` active units are computed exactly from the dense gate row.
    With return_stats, also returns int32 [2]: (overflowing (token, tile) pairs, active units in them).
    """
    if w_down_t is None:
        if w_down is None:
            raise ValueError("give w_down [d_model, d_ff] or w_down_t [d_ff, d_model]")
        w_down_t = w_down.t().contiguous()
    y, stats = torch.ops.sparse_llm.twell_ffn(x, w_gate, w_up, w_down_t, tile, slots)
    return (y, stats) if return_stats else y


def bytes_per_active_pair(d_model: int, gated: bool = True, itemsize: int = 2) -> int:
    """Bytes the fused stage reads per active (token, neuron) pair: the Wu row (gated only), the
    Wd^T row, and the 4-byte slot; from L2 when the weights are resident (they are when
    (2 if gated else 1) * d_ff * d_model * itemsize fits in L2)."""
    return (2 if gated else 1) * d_model * itemsize + 4


__all__ = [
    "FusedConfig", "DEFAULT_CONFIG", "set_default_config", "current_config", "twell_ffn", "twell_ffn_op",
    "twell_pack", "twell_ffn_packed", "fused_defines", "pack_defines", "twell_is_faster", "crossover_active_fraction", "MEASURED_CROSSOVER",
    "bytes_per_active_pair", "MIN_WORK_FOR_TWELL", "num_passes",
]
