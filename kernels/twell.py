"""TwELL inference FFN: gate GEMM -> ReLU + TwELL pack -> fused sparse up / gating / down.

    y = twell_ffn(x, w_gate, w_up, w_down)          # x [..., d_model]; w_gate may be None (non-gated)

Pipeline on CUDA (all on torch.cuda.current_stream(), no host synchronization, CUDA-graph capturable):
 1. G = x W_gate^T by cuBLAS (torch.matmul), in the input dtype. Non-gated: G = x W_up^T.
 2. kernels/cuda/twell_pack.cu: ReLU + TwELL pack of G (per row and tile of `tile` columns: the true
    active count and up to `slots` (bits(value) << 16 | column) entries) and the overflow statistics.
 3. (opt-in, FusedConfig.up_blocked=1; gated FFN where `up_blocked_supported`) kernels/cuda/twell_up.cu:
    per block of 256 tokens, the stored pairs sorted by unit, u = x . Wu[j] with each Wu row read once
    per block; h = g * u replaces g in the slots. Measured slower than step 4 alone on H100 (NOTES_twell.md v7).
 4. kernels/cuda/twell_ffn.cu: per token, walk the active (neuron, g or h) pairs: u = x . Wu[j] and
    h = g * u where step 3 did not run, y += h * Wd^T[j]; a tile whose count exceeds `slots` is read
    from G instead (exact).
Weights keep nn.Linear layout; the down weight is used transposed ([d_ff, d_model], rows contiguous):
pass `w_down_t=w_down.t().contiguous()` (cache it) to skip the transpose per call.

Exposed as the custom op ``torch.ops.sparse_llm.twell_ffn`` (with a fake implementation for
torch.compile / meta tensors, and a CPU implementation that follows twell_reference.py).
Compiled modules are cached in-process and on disk by CuPy (``$CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``).
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from sparse_llm.kernels import twell_reference as _ref
from sparse_llm.kernels.row_order import longest_first
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
    pass_partial16: int = 1  # passes hand on the rounded 16-bit y (0: float32 partial sums; NOTES_twell v8)
    lpt: int = 1  # walk tokens longest-first (per-token active totals from the pack, row_order.longest_first)
    # with lpt: up to split_rows rows of at least split_units active units (the longest) are walked in
    # row_parts parts by as many teams, their float32 partial rows added in part order afterwards
    split_rows: int = 256
    split_units: int = 128
    row_parts: int = 8
    gate_kernel: int = 1  # sm_90a: gate GEMM with ReLU + pack in its epilogue (twell_gate.cu); 0: cuBLAS + pack
    gate_stages: int = 4  # shared-memory pipeline depth of twell_gate.cu (48 KB a stage; 4 at most)
    gate_cluster: int = 2  # CTAs of twell_gate.cu that share (multicast) each Wg tile: 1, 2 or 4
    gate_sms: int = 0  # SMs the persistent twell_gate.cu grid may take (0: all)
    up_blocked: int = 0  # gated: token-blocked up-projection (twell_up.cu) first; slower on H100 so far (NOTES_twell v7)
    up_tokens: int = 256  # tokens per block of twell_up.cu (<= 256)
    up_pair_cap: int = 0  # pairs a twell_up.cu block sorts at once (0: what the shared memory holds)
    up_l2_factor: float = 1.0  # use twell_up.cu while Wu's bytes <= factor x L2 size

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
    # H100 80GB HBM3 (nvidia-h100-x1), bf16, 131072 tokens, 2026-11-24, gate stage twell_gate.cu v5,
    # passes handing on 16-bit partials (v8): kernels/results/bench_v8_h100.log
    (2048, 5632): 0.01382,  # 77.8 active / token
    (2048, 8192): 0.01260,  # 103.2 (2 neuron passes)
    (4096, 11008): 0.01081,  # 119.0 (4 neuron passes: the weights are 3.4x L2)
    (1024, 2816): 0.01661,  # 46.8
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


def shape_problem(d_model: int, d_ff: int) -> Optional[str]:
    """Why the TwELL kernels cannot take this FFN shape, or None."""
    if d_model % 64 or d_ff % 64:
        return f"d_model and d_ff must be multiples of 64, got {d_model} and {d_ff}"
    if d_ff > MAX_D_FF:
        return f"d_ff must be at most {MAX_D_FF}, got {d_ff}"
    return None


def _check_shapes(x_last: int, w_gate, w_up, w_down_t, tile: int, slots: int) -> tuple[int, int]:
    d_ff, d_model = w_up.shape
    if x_last != d_model:
        raise ValueError(f"x has {x_last} features but w_up is [{d_ff}, {d_model}]")
    if w_gate is not None and tuple(w_gate.shape) != (d_ff, d_model):
        raise ValueError(f"w_gate must be [{d_ff}, {d_model}] like w_up, got {tuple(w_gate.shape)}")
    if tuple(w_down_t.shape) != (d_ff, d_model):
        raise ValueError(f"w_down_t must be [d_ff, d_model] = [{d_ff}, {d_model}], got {tuple(w_down_t.shape)}"
                         " (pass w_down [d_model, d_ff] to twell_ffn, or w_down.t().contiguous())")
    problem = shape_problem(d_model, d_ff)
    if problem:
        raise ValueError(problem)
    if tile % 256 or not 256 <= tile <= 65536:
        raise ValueError(f"tile must be a multiple of 256 in [256, 65536], got {tile}")
    if not 1 <= slots <= min(MAX_SLOTS, tile):
        raise ValueError(f"slots must be in [1, {min(MAX_SLOTS, tile)}], got {slots}")
    return d_model, d_ff


def fused_defines(d_model: int, tile: int, slots: int, gated: bool, dtype: torch.dtype,
                  config: Optional[FusedConfig] = None, hslots: bool = False) -> dict[str, int]:
    """The -D defines twell_ffn.cu is compiled with for this problem and launch configuration
    (`hslots`: the slots hold h = g * u from twell_up.cu)."""
    cfg = config or current_config()
    block = cfg.block(d_model)
    defines = dict(TW_DMODEL=d_model, TW_TILE=tile, TW_SLOTS=slots, TW_GATED=int(gated), TW_DTYPE=_dtype_code(dtype),
                   TW_TEAM=cfg.team(d_model), TW_BLOCK=block, TW_MINB=max(1, 65536 // (block * cfg.regs)),
                   TW_GROUP=cfg.group, TW_HINTS=cfg.hints, TW_SCAN=cfg.scan, TW_PREFETCH=cfg.prefetch,
                   TW_PARTS=cfg.row_parts)
    if hslots:
        defines["TW_HSLOTS"] = 1
    return defines


# ---------------------------------------------------------------------------------------------
# Token-blocked up-projection (twell_up.cu)
UP_THREADS = 384
UP_MAX_D_FF = 16384  # its unit histogram lives in shared memory
_UP_MIN_PAIR_CAP = 1024


def up_defines(d_model: int, tile: int, slots: int, dtype: torch.dtype,
               config: Optional[FusedConfig] = None) -> dict[str, int]:
    cfg = config or current_config()
    return dict(TW_DMODEL=d_model, TW_TILE=tile, TW_SLOTS=slots, TW_DTYPE=_dtype_code(dtype),
                TU_TOKENS=cfg.up_tokens, TU_THREADS=UP_THREADS)


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def up_shared_bytes(d_model: int, d_ff: int, tile: int, tokens: int, pair_cap: int) -> int:
    """Dynamic shared memory of twell_up.cu: the staged x slice (128 columns, or 64 where d_model is
    not a multiple of 128), row and token prefix sums, the unit histogram, 8 bytes a pair (key and
    sum), 2 bytes (its sorted position) and an 80-byte record a tile of 16 pairs."""
    cols = 128 if d_model % 128 == 0 else 64
    nt = num_tiles(d_ff, tile)
    return (tokens * cols * 2 + 4 * (_round4(tokens * nt + 1) + _round4(tokens + 1) + _round4(d_ff + 1))
            + 10 * pair_cap + 80 * -(-pair_cap // 16))


def _shared_optin(device: torch.device) -> int:
    from sparse_llm.kernels.loader import device_properties

    props = device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or (227 * 1024 if props.major >= 9 else 99 * 1024))


def up_pair_capacity(device: torch.device, d_model: int, d_ff: int, tile: int, config: Optional[FusedConfig] = None) -> int:
    """Pairs a twell_up.cu block sorts at once: the config's cap, else what the shared memory holds."""
    cfg = config or current_config()
    room = (_shared_optin(device) - 2048 - up_shared_bytes(d_model, d_ff, tile, cfg.up_tokens, 0)) // 15 // 16 * 16
    return min(room, cfg.up_pair_cap) if cfg.up_pair_cap > 0 else room


def _up_shape_problem(d_ff: int, slots: int, cfg: FusedConfig) -> Optional[str]:
    """Why twell_up.cu cannot take this shape or config on any device, or None."""
    if slots % 4:
        return f"slots must be a multiple of 4 (got {slots}): the kernel reads them 16 bytes at a time"
    if d_ff > UP_MAX_D_FF:
        return f"d_ff must be at most {UP_MAX_D_FF} (got {d_ff}): its unit histogram lives in shared memory"
    if not 1 <= cfg.up_tokens <= 256:
        return f"FusedConfig.up_tokens must be in [1, 256] (got {cfg.up_tokens}): a token's index travels in 8 bits"
    return None


def _up_blocked_problem(device: torch.device, d_model: int, d_ff: int, tile: int, slots: int,
                        cfg: FusedConfig) -> Optional[str]:
    """Why twell_up.cu cannot take this problem, or None."""
    problem = _up_shape_problem(d_ff, slots, cfg)
    if problem is not None:
        return problem
    if device.type != "cuda":
        return f"it runs on CUDA only (got a {device.type} tensor)"
    need = num_tiles(d_ff, tile) * slots
    cap = up_pair_capacity(device, d_model, d_ff, tile, cfg)
    if cap < need or cfg.up_pair_cap % 16:
        return (f"the pair capacity {cap} (FusedConfig.up_pair_cap={cfg.up_pair_cap}, 0 = what shared memory holds) "
                f"must be a multiple of 16 and hold one token's {need} slots")
    return None


def up_blocked_supported(device: torch.device, d_model: int, d_ff: int, tile: int, slots: int,
                         config: Optional[FusedConfig] = None) -> bool:
    """True where the gated fused stage runs twell_up.cu first: enabled (FusedConfig.up_blocked), a
    problem the kernel takes (`twell_up_blocked`), Wu within `up_l2_factor` x L2, and room for a block
    to sort at least 1024 pairs."""
    cfg = config or current_config()
    if not cfg.up_blocked or _up_blocked_problem(device, d_model, d_ff, tile, slots, cfg) is not None:
        return False
    from sparse_llm.kernels.loader import device_properties

    if d_ff * d_model * 2 > cfg.up_l2_factor * device_properties(device).L2_cache_size:
        return False
    return up_pair_capacity(device, d_model, d_ff, tile, cfg) >= _UP_MIN_PAIR_CAP or cfg.up_pair_cap > 0


def twell_up_blocked(x2d: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, w_up: torch.Tensor,
                     tile: int = DEFAULT_TILE, out: Optional[torch.Tensor] = None,
                     config: Optional[FusedConfig] = None) -> torch.Tensor:
    """h = g * (x . Wu[j]) for every stored slot of a non-overflowing tile, as (bits(h) << 16) | column
    in `out` (default: a new tensor; `packed` itself to work in place). Slots past a tile's count and
    the slots of overflowing tiles are left as they are. CUDA; slots a multiple of 4; d_ff <= 16384."""
    from sparse_llm.kernels.loader import get_kernel, launch, ptr

    cfg = config or current_config()
    n, d_model = x2d.shape
    d_ff = w_up.shape[0]
    slots = packed.shape[-1]
    problem = _up_blocked_problem(x2d.device, d_model, d_ff, tile, slots, cfg)
    if problem is not None:
        raise ValueError(f"twell_up_blocked: {problem}")
    out = torch.empty_like(packed) if out is None else out
    if n == 0:
        return out
    cap = up_pair_capacity(x2d.device, d_model, d_ff, tile, cfg)
    kernel = get_kernel("twell_up.cu", "twell_up_blocked", x2d.device, **up_defines(d_model, tile, slots, x2d.dtype, cfg))
    shared = up_shared_bytes(d_model, d_ff, tile, cfg.up_tokens, cap)
    launch(kernel, (-(-n // cfg.up_tokens),), (UP_THREADS,),
           (ptr(x2d), ptr(counts), ptr(packed), ptr(w_up), ptr(out), np.int32(n), np.int32(d_ff), np.int32(cap)),
           shared_mem=shared)
    return out


def kernel_variants(d_model: int, d_ff: int, gated: bool, dtype: torch.dtype,
                    arch: str = "sm_90a") -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of the modules an inference forward of this FFN shape compiles on `arch` with
    the default tile, slots and launch configuration (for the ahead-of-time warm-up)."""
    _check_shapes(d_model, torch.empty(d_ff, d_model, device="meta") if gated else None,
                  torch.empty(d_ff, d_model, device="meta"), torch.empty(d_ff, d_model, device="meta"),
                  DEFAULT_TILE, DEFAULT_SLOTS)
    cfg = current_config()
    variants = [("twell_pack.cu", pack_defines(DEFAULT_TILE, DEFAULT_SLOTS, dtype, cfg.pack_unroll)),
                ("twell_ffn.cu", fused_defines(d_model, DEFAULT_TILE, DEFAULT_SLOTS, gated, dtype))]
    if gated and cfg.up_blocked and _up_shape_problem(d_ff, DEFAULT_SLOTS, cfg) is None:  # the device decides the rest
        variants += [("twell_up.cu", up_defines(d_model, DEFAULT_TILE, DEFAULT_SLOTS, dtype)),
                     ("twell_ffn.cu", fused_defines(d_model, DEFAULT_TILE, DEFAULT_SLOTS, gated, dtype, hslots=True))]
    if arch == GATE_KERNEL_ARCH and DEFAULT_TILE == GATE_KERNEL_TILE:
        variants.append(("twell_gate.cu", gate_defines(DEFAULT_SLOTS, dtype, cfg.gate_stages, cfg.gate_cluster)))
    return variants


def pack_defines(tile: int, slots: int, dtype: torch.dtype, unroll: int = 4) -> dict[str, int]:
    return dict(TW_TILE=tile, TW_SLOTS=slots, TW_DTYPE=_dtype_code(dtype), TW_PACK_UNR=unroll)


def gate_shared_bytes(stages: int) -> int:
    """Dynamic shared memory of twell_gate.cu (TG_SMEM_BYTES): alignment slack, the pipeline stages
    (a 128 x 64 X tile and a 256 x 64 Wg tile each), the 8 consumer warps' 4 KB epilogue scratch
    and the mbarriers."""
    return 1024 + stages * (_GATE_BLOCK_ROWS + GATE_KERNEL_TILE) * _GATE_BLOCK_K * 2 + 8 * 4096 + 2 * stages * 8


def gate_defines(slots: int, dtype: torch.dtype, stages: int = 4, cluster: int = 2,
                 write_all: bool = False) -> dict[str, int]:
    """The -D defines of twell_gate.cu (the fused gate GEMM + pack; 256-column tiles only)."""
    return dict(TW_TILE=GATE_KERNEL_TILE, TW_SLOTS=slots, TW_DTYPE=_dtype_code(dtype), TG_STAGES=stages,
                TG_CLUSTER=cluster, TG_WRITE_ALL=int(write_all))


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


# ---------------------------------------------------------------------------------------------
# Fused gate GEMM + ReLU + pack (twell_gate.cu): Hopper only (wgmma + TMA), 256-column tiles.
GATE_KERNEL_ARCH = "sm_90a"
GATE_KERNEL_TILE = 256
_GATE_BLOCK_ROWS, _GATE_BLOCK_K = 128, 64  # TG_BM, TG_BK: X tiles are 128 x 64, Wg tiles 256 x 64
_TENSOR_MAP = np.dtype([("words", np.uint64, (16,))])  # the driver's opaque 128-byte CUtensorMap
_CU_TENSOR_DTYPE = {torch.float16: 6, torch.bfloat16: 9}  # CU_TENSOR_MAP_DATA_TYPE_{FLOAT16,BFLOAT16}
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3


def gate_kernel_supported(device: torch.device, dtype: torch.dtype, tile: int, slots: int) -> bool:
    """True where twell_gate.cu runs: a Hopper GPU (sm_90a), bf16/fp16, 256-column tiles."""
    if device.type != "cuda" or dtype not in _CU_TENSOR_DTYPE or tile != GATE_KERNEL_TILE or slots > MAX_SLOTS:
        return False
    from sparse_llm.kernels.loader import arch_flag, device_properties

    props = device_properties(device)
    return arch_flag(props.major, props.minor) == GATE_KERNEL_ARCH and _encoder() is not None


@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


@functools.lru_cache(maxsize=None)
def _encoder():
    """The driver's cuTensorMapEncodeTiled through ctypes (None if the driver library lacks it)."""
    try:
        fn = _libcuda().cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def tensor_map(matrix: torch.Tensor, box_rows: int) -> np.void:
    """TMA descriptor of a row-major 16-bit matrix read in (box_rows x 64) tiles with 128-byte swizzle
    (out-of-bounds rows read as zeros), as a by-value kernel argument."""
    rows, cols = matrix.shape
    storage = (ctypes.c_uint8 * 192)()  # the descriptor must be 64-byte aligned
    address = (ctypes.addressof(storage) + 63) & ~63
    result = _encoder()(address, _CU_TENSOR_DTYPE[matrix.dtype], 2, matrix.data_ptr(),
                        (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(matrix.stride(0) * matrix.element_size()),
                        (ctypes.c_uint32 * 2)(_GATE_BLOCK_K, box_rows), (ctypes.c_uint32 * 2)(1, 1),
                        0, _SWIZZLE_128B, _L2_PROMOTION_256B, 0)
    if result != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {result} for a {tuple(matrix.shape)} "
                           f"{matrix.dtype} matrix (needs 16-byte aligned rows and base)")
    return np.frombuffer(ctypes.string_at(address, 128), dtype=_TENSOR_MAP)[0]


class _LaunchConfig(ctypes.Structure):  # the driver's CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]


_RESIDENT_CLUSTERS: dict[tuple[int, int], int] = {}


def _resident_clusters(kernel, cluster: int, shared: int, sms: int) -> int:
    """Clusters of `kernel` the GPU runs at once (cuOccupancyMaxActiveClusters). A persistent grid
    must not ask for more: the clusters that do not fit would start only when others end and
    double the time (a GPC's SM count need not be a multiple of the cluster size)."""
    from sparse_llm.kernels.loader import allow_shared_mem

    key = (id(kernel), shared)
    if key not in _RESIDENT_CLUSTERS:
        allow_shared_mem(kernel, shared)
        count = sms // cluster
        if cluster > 1:
            query = _libcuda().cuOccupancyMaxActiveClusters
            config = _LaunchConfig((cluster * count, 1, 1), (384, 1, 1), shared, None, None, 0)
            found = ctypes.c_int(0)
            function = getattr(kernel, "kernel", kernel)  # CuPy RawKernel -> its driver Function
            if query(ctypes.byref(found), ctypes.c_void_p(int(function.ptr)), ctypes.byref(config)) != 0:
                raise RuntimeError(f"cuOccupancyMaxActiveClusters failed for twell_gate_pack (cluster {cluster})")
            count = min(count, found.value)
        _RESIDENT_CLUSTERS[key] = max(1, count)
    return _RESIDENT_CLUSTERS[key]


def twell_gate_pack(x2d: torch.Tensor, w_gate: torch.Tensor, slots: int = DEFAULT_SLOTS, *,
                    row_total: Optional[torch.Tensor] = None, write_all: bool = False,
                    config: Optional[FusedConfig] = None):
    """G = x2d w_gate^T on the tensor cores with ReLU + TwELL pack (256-column tiles) in the epilogue.

    Returns (gate [N, d_ff], counts, slots, stats) like `twell_pack(x2d @ w_gate.t())`, except that
    `gate` holds only the overflowing tiles (the part the fused stage reads), or every value with
    `write_all`. Needs `gate_kernel_supported`."""
    from sparse_llm.kernels.loader import device_properties, get_kernel, launch, ptr

    n, d_model = x2d.shape
    d_ff = w_gate.shape[0]
    nt = num_tiles(d_ff, GATE_KERNEL_TILE)
    gate = torch.empty(n, d_ff, dtype=x2d.dtype, device=x2d.device)
    counts = torch.empty(n, nt, dtype=torch.int32, device=x2d.device)
    packed = torch.empty(n, nt, slots, dtype=torch.int32, device=x2d.device)
    stats = torch.zeros(2, dtype=torch.int32, device=x2d.device)
    if n == 0:
        return gate, counts, packed, stats
    cfg = config or current_config()
    stages, cluster = cfg.gate_stages, cfg.gate_cluster
    if not 1 <= stages <= 4 or cluster not in (1, 2, 4):
        raise ValueError(f"FusedConfig.gate_stages must be in 1..4 (got {stages}) and gate_cluster 1, 2 or 4 "
                         f"(got {cluster}): four 48 KB stages fill the shared memory")
    defines = gate_defines(slots, x2d.dtype, stages, cluster, write_all)
    kernel = get_kernel("twell_gate.cu", "twell_gate_pack", x2d.device, **defines)
    shared = gate_shared_bytes(stages)
    cluster_tiles = -(-n // (_GATE_BLOCK_ROWS * cluster)) * nt
    resident = _resident_clusters(kernel, cluster, shared, device_properties(x2d.device).multi_processor_count)
    if cfg.gate_sms > 0:
        resident = max(1, min(resident, cfg.gate_sms // cluster))
    grid = (cluster * min(cluster_tiles, resident),)
    w_map = tensor_map(w_gate, GATE_KERNEL_TILE // cluster)  # each CTA of a cluster loads a slice
    launch(kernel, grid, (384,), (tensor_map(x2d, _GATE_BLOCK_ROWS), w_map, ptr(gate),
                                  ptr(counts), ptr(packed), ptr(stats), ptr(row_total), np.int32(n), np.int32(d_ff),
                                  np.int32(d_model)), shared_mem=shared)
    return gate, counts, packed, stats


def num_passes(d_model: int, d_ff: int, gated: bool, device: torch.device, config: Optional[FusedConfig] = None) -> int:
    """Neuron passes of the fused stage: enough that each pass's weight rows stay L2-resident
    (`gated`: it streams Wu rows as well as Wd^T rows)."""
    cfg = config or current_config()
    if cfg.passes > 0:
        return cfg.passes
    from sparse_llm.kernels.loader import device_properties

    l2 = device_properties(device).L2_cache_size
    weight_bytes = (2 if gated else 1) * d_ff * d_model * 2
    return max(1, math.ceil(weight_bytes / (cfg.pass_l2_factor * l2)))


def pass_tile_ranges(nt: int, passes: int) -> list[tuple[int, int]]:
    """The fused stage's neuron passes as [first, last) column-tile ranges: `passes` (at most nt) of
    equal size, the last one shorter."""
    per_pass = -(-nt // max(1, min(passes, nt)))
    return [(first, min(nt, first + per_pass)) for first in range(0, nt, per_pass)]


def twell_ffn_packed(x2d: torch.Tensor, gate: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor,
                     w_up: Optional[torch.Tensor], w_down_t: torch.Tensor, tile: int = DEFAULT_TILE,
                     out: Optional[torch.Tensor] = None, config: Optional[FusedConfig] = None,
                     order: Optional[torch.Tensor] = None, hslots: bool = False,
                     split: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused sparse stage: y [N, d_model] from x [N, d_model], the dense gate G [N, d_ff] (read
    only for overflowing tiles) and its TwELL form. `w_up=None` is the non-gated FFN (h = ReLU(G)).
    `order` (int32 [N], a permutation of the tokens) is the order in which tokens are taken.
    `hslots`: the slots hold h = g * u (twell_up_blocked's output), so only overflowing tiles use w_up.
    `split` (int32 device scalar, with `order`): the first min(split, FusedConfig.split_rows) tokens
    of `order` are walked in FusedConfig.row_parts parts each (twell_ffn.cu, "Long rows")."""
    from sparse_llm.kernels.loader import device_properties, get_kernel, launch, ptr

    cfg = config or current_config()
    if not 1 <= cfg.row_parts <= 64 or cfg.split_rows < 0 or cfg.split_units < 1:
        raise ValueError(f"FusedConfig.row_parts must be in [1, 64] (got {cfg.row_parts}), split_rows >= 0 "
                         f"(got {cfg.split_rows}) and split_units >= 1 (got {cfg.split_units})")
    n, d_model = x2d.shape
    d_ff = gate.shape[1]
    slots = packed.shape[-1]
    y = out if out is not None else torch.empty_like(x2d)
    if n == 0:
        return y
    if hslots and (w_up is None or cfg.scan):
        raise ValueError("hslots needs the gated FFN (w_up) and the packed form (FusedConfig.scan=0)")
    defines = fused_defines(d_model, tile, slots, w_up is not None, x2d.dtype, cfg, hslots)
    kernel = get_kernel("twell_ffn.cu", "twell_ffn_fused", x2d.device, **defines)
    block = defines["TW_BLOCK"]
    tokens_per_block = block // 32 // defines["TW_TEAM"]
    sms = device_properties(x2d.device).multi_processor_count
    resident = _resident_blocks(kernel, block, defines["TW_MINB"])
    grid = (max(1, min(-(-n // tokens_per_block), int(sms * resident * cfg.grid_fill))),)
    nt = num_tiles(d_ff, tile)
    ranges = pass_tile_ranges(nt, num_passes(d_model, d_ff, w_up is not None and not hslots, x2d.device, cfg))
    passes = len(ranges)
    work = torch.zeros(passes, dtype=torch.int32, device=x2d.device)
    float_partials = passes > 1 and not cfg.pass_partial16
    y_acc = torch.empty(n, d_model, dtype=torch.float32, device=x2d.device) if float_partials else None
    rows = min(cfg.split_rows, n) if split is not None and order is not None and not cfg.scan else 0
    part_y = torch.empty(rows, cfg.row_parts, d_model, dtype=torch.float32, device=x2d.device) if rows else None
    finish = get_kernel("twell_ffn.cu", "twell_rows_finish", x2d.device, **defines) if rows else None
    for p, (first, last) in enumerate(ranges):
        if float_partials:
            flags = (1 if p > 0 else 0) | (2 if p < passes - 1 else 0)
        else:
            flags = 4 if p > 0 else 0
        args = (ptr(x2d), ptr(gate), ptr(counts), ptr(packed), ptr(w_up), ptr(w_down_t), ptr(y), ptr(y_acc),
                np.uint64(work.data_ptr() + 4 * p), ptr(order), ptr(split), ptr(part_y), np.int32(rows),
                np.int32(n), np.int32(d_ff), np.int32(first), np.int32(last),
                np.int32(flags))
        launch(kernel, grid, (block,), args)
        if rows:
            launch(finish, (rows,), (min(d_model // 8, 1024),), (ptr(part_y), ptr(order), ptr(split), ptr(y), ptr(y_acc),
                                                      np.int32(rows), np.int32(n), np.int32(flags)))
    return y


def _twell_ffn_cuda(x, w_gate, w_up, w_down_t, tile, slots):
    d_model = x.shape[-1]
    x2 = _aligned(x.reshape(-1, d_model))
    w_up = _aligned(w_up)
    w_down_t = _aligned(w_down_t)
    gate_w = w_up if w_gate is None else _aligned(w_gate)
    cfg = current_config()
    row_total = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device) if cfg.lpt else None
    if cfg.gate_kernel and not cfg.scan and gate_kernel_supported(x.device, x.dtype, tile, slots):
        gate, counts, packed, stats = twell_gate_pack(x2, gate_w, slots, row_total=row_total)
        return _fused_stage(x2, gate, counts, packed, stats, row_total, w_gate, w_up, w_down_t, tile, cfg, x.shape)
    gate = torch.matmul(x2, gate_w.t())
    if cfg.scan:
        nt = num_tiles(gate.shape[1], tile)
        # the scan variant reads no packed form (and so has no overflow to count)
        counts = torch.empty(0, nt, dtype=torch.int32, device=x.device)
        packed = torch.empty(0, nt, slots, dtype=torch.int32, device=x.device)
        stats = torch.zeros(2, dtype=torch.int32, device=x.device)
        y = twell_ffn_packed(x2, gate, counts, packed, None if w_gate is None else w_up, w_down_t, tile, config=cfg)
        return y.view(*x.shape[:-1], d_model), stats
    counts, packed, stats = twell_pack(gate, tile, slots, row_total=row_total)
    return _fused_stage(x2, gate, counts, packed, stats, row_total, w_gate, w_up, w_down_t, tile, cfg, x.shape)


def twell_sparse_stage(x2d: torch.Tensor, gate: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor,
                       w_up: Optional[torch.Tensor], w_down_t: torch.Tensor, tile: int = DEFAULT_TILE,
                       config: Optional[FusedConfig] = None, order: Optional[torch.Tensor] = None,
                       in_place: bool = True, split: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Everything after the gate and pack: twell_up_blocked where supported (gated), then the fused
    stage. The blocked up-projection writes h into `packed` itself, or with `in_place=False` into a
    new buffer (so that `packed` can be used again, as the benchmarks do)."""
    cfg = config or current_config()
    d_model = x2d.shape[1]
    if (w_up is not None and not cfg.scan
            and up_blocked_supported(x2d.device, d_model, gate.shape[1], tile, packed.shape[-1], cfg)):
        h_slots = twell_up_blocked(x2d, counts, packed, w_up, tile, out=packed if in_place else None, config=cfg)
        return twell_ffn_packed(x2d, gate, counts, h_slots, w_up, w_down_t, tile, config=cfg, order=order,
                                hslots=True, split=split)
    return twell_ffn_packed(x2d, gate, counts, packed, w_up, w_down_t, tile, config=cfg, order=order, split=split)


def _fused_stage(x2, gate, counts, packed, stats, row_total, w_gate, w_up, w_down_t, tile, cfg, shape):
    # longest-first order: heavy tokens start first, so none of them finishes alone at the end; the
    # longest of them are split over several teams (no host sync: the count stays on the device)
    order, split = None, None
    if row_total is not None:
        order, split = longest_first(row_total, cfg.split_units if cfg.split_rows > 0 else None)
    y = twell_sparse_stage(x2, gate, counts, packed, None if w_gate is None else w_up, w_down_t, tile, cfg, order,
                           split=split)
    return y.view(*shape), stats


@torch.library.custom_op("sparse_llm::twell_ffn", mutates_args=())
def twell_ffn_op(x: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down_t: torch.Tensor,
                 tile: int, slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [..., d_model], stats int32 [2] = (overflowing tiles, active entries in them))."""
    _check_shapes(x.shape[-1], w_gate, w_up, w_down_t, tile, slots)
    if x.is_cuda:
        _dtype_code(x.dtype)
        from sparse_llm.kernels.loader import capability_problem, device_properties

        props = device_properties(x.device)
        old_gpu = capability_problem(props.major, props.minor)
        if old_gpu:
            raise RuntimeError(f"TwELL on {x.device}: {old_gpu}; run the FFN with kernel=torch")
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
    "pass_tile_ranges", "twell_gate_pack", "gate_kernel_supported", "shape_problem",
    "gate_defines", "tensor_map", "twell_up_blocked", "up_blocked_supported", "up_defines", "up_shared_bytes",
    "twell_sparse_stage",
]
