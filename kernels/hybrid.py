"""Hybrid-format sparse FFN for training: `hybrid_ffn(x, w_gate, w_up, w_down, *, ell_width=None)`.

Returns (y, l1_sum, tile_counts, neuron_counts): y [N, d_model] and l1_sum (float32 scalar, sum of
|h|; float64 for float64 inputs) are differentiable w.r.t. x and the weights; the counts are the statistics of
`reference.activation_stats`. Two `torch.library.custom_op`s in namespace `sparse_llm`:
`hybrid_ffn_fwd` (also returns the hybrid format saved for the backward) and `hybrid_ffn_bwd`.
CPU tensors (and CUDA shapes the kernels do not take) run `hybrid_reference`; CUDA runs the
kernels of kernels/cuda/hybrid.cu. No host synchronisation in either direction. The forward also
returns the row plan of the warp-per-token kernels (`_row_plan`), which the backward reuses.

`HybridRouter` decides per layer between dense and hybrid from the measured active fraction, with
hysteresis, on the device; the host reads the decision only when it synchronises anyway (log steps).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from sparse_llm.kernels import hybrid_reference as ref
from sparse_llm.kernels.loader import device_properties, launch, resident_blocks
from sparse_llm.kernels.row_order import longest_first

DEFAULT_ELL_WIDTH = 128
SOURCE = "hybrid.cu"
_FWD_WARPS = 4  # = FWD_WARPS in hybrid.cu
_TR_BLOCKS = 4  # = TR_BLOCKS in hybrid.cu: 32-token blocks per warp of hy_transpose
_DW_THREADS = 256  # = DW_CTA_WARPS * 32 in hybrid.cu: the dW passes' CTAs (a warp per item)
# The dW passes (hy_dwy, hy_dwx): a unit active on more tokens than this (by the forward's neuron counts)
# is split into items of this many tokens each, so a unit that fires on most tokens does not become
# the passes' tail; the items add float32 rows (order-dependent in the last bits). In the calibrated 2B
# model's layers (~100 units on 512 to all 16384 tokens) 256 beat 128, 512 and 2048 (NOTES_hybrid v20).
DW_SPLIT_TOKENS = 256
# The dW passes' shape (= HY_DWY_C, HY_DWY_DEPTH, HY_DWX_DEPTH in hybrid.cu): hy_dwy's 256-column chunks
# a slice (the parts of dy.Wd_j stored per pair are d_model / 256 / that), and the tokens in each pass's
# per-warp cp.async ring; other values (for experiments/dw_pass_shapes.py) compile their own modules.
DW_PASS_SHAPE = (4, 4, 8)
# hy_forward and hy_dx: up to SPLIT_ROWS rows with at least SPLIT_ROW_UNITS active units (the longest)
# are split over ROW_PARTS warps each, instead of one warp taking the row: in whole models the first
# positions of each sequence activate hundreds to thousands of units where the mean is ~30.
SPLIT_ROWS, SPLIT_ROW_UNITS = 256, 128
# hy_fill_au splits up to this many rows (of at least SPLIT_ROW_UNITS units) the same way: it writes each
# pair's (a, u) on its own, so more rows cost it no partial sums (on the heavy-tailed benchmark rows
# past the 256 longest still had dozens of pairs past the saved ELL, one warp each).
FILL_SPLIT_ROWS = 1024
BACKWARD_ELL_WIDTH = 1024  # ranks stored through the backward at 16 bytes a pair, see backward_ell_width
ROW_PARTS = 16  # = ROW_PARTS in hybrid.cu
# The gate GEMM: on Hopper, where the TwELL gate kernel takes the shape, the GEMM with the TwELL pack
# in its epilogue (kernels/twell.py, twell_gate.cu) and hy_from_twell, instead of cuBLAS's G and
# hy_pack (which reads all of G back: 0.09 ms at 16384 x 5632); False (or the environment's
# SPARSE_LLM_HYBRID_FUSED_GATE=0) always takes cuBLAS. GATE_SLOTS: the TwELL tile width it asks for
# (a tile with more active units writes its dense segment, which hy_from_twell reads).
FUSED_GATE = os.environ.get("SPARSE_LLM_HYBRID_FUSED_GATE", "1") != "0"
GATE_SLOTS = 16
# hy_forward's __launch_bounds__ min-blocks (1: ptxas's choice, ~230 registers at d_model 2048, so 2
# CTAs of 4 warps per SM).
FWD_MIN_BLOCKS = 1


def resolve_ell_width(ell_width: Optional[int], d_ff: int) -> int:
    width = DEFAULT_ELL_WIDTH if ell_width is None else int(ell_width)
    if width < 1:
        raise ValueError(f"ell_width must be >= 1, got {width}")
    return min(width, max(d_ff, 1))


def _dwy_chunks(d_model: int) -> int:
    """256-column chunks of a hy_dwy slice (= DWY_C in hybrid.cu)."""
    chunks, per_slice = d_model // 256, DW_PASS_SHAPE[0]
    return per_slice if chunks % per_slice == 0 else 2 if chunks % 2 == 0 else 1


def dwy_slices(d_model: int) -> int:
    """Column slices of hy_dwy (= DWY_SLICES in hybrid.cu): the parts of dy_t.Wd_j stored per pair."""
    return d_model // 256 // _dwy_chunks(d_model)


def _dw_ring_bytes(d_model: int) -> tuple[int, int]:
    """hy_dwy's and hy_dwx's dynamic shared memory: per warp a ring of DEPTH tokens' slices (16 bytes a
    lane a chunk; hy_dwx's slices are 2 chunks, or 1 where d_model / 256 is odd)."""
    chunks_x = 2 if (d_model // 256) % 2 == 0 else 1
    per_chunk = _DW_THREADS * 16
    return (DW_PASS_SHAPE[1] * _dwy_chunks(d_model) * per_chunk, DW_PASS_SHAPE[2] * chunks_x * per_chunk)


def backward_ell_width(width: int, d_ff: int, d_model: int) -> int:
    """WD, the ranks whose pairs the backward stores (hy_dwy's parts of dy.Wd_j, and (a, u) past the
    saved ELL's `width`), in slots of 4 * dwy_slices + 8 bytes sized so that a token takes the bytes of
    BACKWARD_ELL_WIDTH 16-byte slots (16 KB: 268 MB at 16384 tokens, for one layer's backward).
    Pairs past WD are recomputed from the whole rows in every pass (exact, and slow): in models' deep
    layers the first positions of a sequence reach thousands of units (experiments/dw_model.py)."""
    slot_bytes = 4 * dwy_slices(d_model) + 8
    return max(width, min(BACKWARD_ELL_WIDTH * 16 // slot_bytes, d_ff))


def shape_problem(d_model: int, d_ff: int) -> Optional[str]:
    """Why the CUDA kernels cannot take this FFN shape (the PyTorch reference then runs), or None."""
    if d_model % 256 or not 256 <= d_model <= 4096:
        return f"d_model must be a multiple of 256 in [256, 4096], got {d_model}"
    if d_ff % 32 or not 0 < d_ff <= 65504:
        return f"d_ff must be a multiple of 32 in [32, 65504], got {d_ff}"
    return None


def shape_supported(d_model: int, d_ff: int) -> bool:
    return shape_problem(d_model, d_ff) is None


def kernel_supported(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor) -> bool:
    """Whether the CUDA kernels take these tensors (else the reference runs, on the same device)."""
    tensors = [t for t in (x, w_gate, w_up, w_down) if t is not None]
    if not all(t.is_cuda for t in tensors):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != x.dtype for t in tensors):
        return False
    d_model, d_ff = x.shape[1], w_up.shape[0]
    if not shape_supported(d_model, d_ff):
        return False
    if x.shape[0] >= 2**31 // max(d_model, d_ff):
        return False
    from sparse_llm.kernels.loader import capability_problem, cupy_available

    props = device_properties(x.device)
    return cupy_available() and capability_problem(props.major, props.minor) is None


# ----------------------------------------------------------------------------------------------
# CUDA launches


KERNEL_NAMES = ("hy_pack", "hy_from_twell", "hy_forward", "hy_rows_finish", "hy_transpose", "hy_dw_plan",
                "hy_fill_au", "hy_dwy", "hy_dwx", "hy_dw_zero", "hy_dw_finish", "hy_dx", "hy_transpose16")


def kernel_defines(name: str, d_model: int, gated: bool, dtype: torch.dtype) -> dict[str, int]:
    """The -D defines hybrid.cu is compiled with for kernel `name` (hy_transpose16 is shape-free)."""
    if name == "hy_transpose16":
        d_model, gated = 256, True
    defines = dict(HY_D=d_model, HY_GATED=int(gated), HY_DTYPE=0 if dtype == torch.bfloat16 else 1)
    if name == "hy_forward" and FWD_MIN_BLOCKS != 1:
        defines["HY_FWD_MINB"] = FWD_MIN_BLOCKS
    if name in ("hy_dwy", "hy_dwx", "hy_dx") and DW_PASS_SHAPE != (4, 4, 8):
        defines.update(zip(("HY_DWY_C", "HY_DWY_DEPTH", "HY_DWX_DEPTH"), DW_PASS_SHAPE))
    return defines


def kernel_variants(d_model: int, d_ff: int, gated: bool, dtype: torch.dtype,
                    arch: str = "sm_90a") -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of every module a training step of this FFN shape compiles on `arch` (for the
    warm-up)."""
    from sparse_llm.kernels import twell

    variants = {tuple(sorted(kernel_defines(n, d_model, gated, dtype).items())) for n in KERNEL_NAMES}
    modules = [(SOURCE, dict(v)) for v in sorted(variants)]
    if FUSED_GATE and arch == twell.GATE_KERNEL_ARCH and twell.shape_problem(d_model, d_ff) is None:
        cfg = twell.current_config()
        modules.append(("twell_gate.cu", twell.gate_defines(GATE_SLOTS, dtype, cfg.gate_stages, cfg.gate_cluster)))
    return modules


def fused_gate_supported(x: Tensor, w: Tensor) -> bool:
    """Whether the forward takes its gate GEMM from the TwELL gate kernel for x [N, d_model] and the
    gate-role weight w [d_ff, d_model] (Hopper, 16-bit, both dims multiples of 64)."""
    from sparse_llm.kernels import twell

    return (FUSED_GATE and x.is_cuda and x.dim() == 2 and x.shape[0] > 0 and x.dtype == w.dtype
            and twell.shape_problem(x.shape[1], w.shape[0]) is None
            and twell.gate_kernel_supported(x.device, x.dtype, twell.GATE_KERNEL_TILE, GATE_SLOTS))


def _kernel(name: str, device, d_model: int, gated: bool, dtype: torch.dtype):
    from sparse_llm.kernels.loader import get_kernel

    return get_kernel(SOURCE, name, device, **kernel_defines(name, d_model, gated, dtype))


def _c(t: Tensor) -> Tensor:
    """Contiguous with a 16-byte aligned start (the kernels use 16-byte vector accesses)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _transpose16(t: Tensor) -> Tensor:
    """[R, C] -> contiguous [C, R] for 16-bit tensors with even R and C (one tiled kernel)."""
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    t = _c(t)
    r, c = t.shape
    out = torch.empty(c, r, dtype=t.dtype, device=t.device)
    if r and c:
        launch(_kernel("hy_transpose16", t.device, 256, True, t.dtype), ((c + 63) // 64, (r + 63) // 64),
               (32, 8), (ptr(t), ptr(out), np.int32(r), np.int32(c)))
    return out


def _row_plan(tprefix: Tensor) -> tuple[Tensor, Tensor]:
    """For the warp-per-token kernels: the token order (most active rows first, so that a long row
    starts early instead of finishing last) and how many of its first rows are split over ROW_PARTS
    warps (a device scalar: no host sync; at most `_split_bound` rows)."""
    lengths = tprefix[:, -1]  # active units before the row's last tile: a cheap lower bound of its count
    return longest_first(lengths, SPLIT_ROW_UNITS)


def _split_bound(n: int) -> int:
    """The static bound R on the number of split rows (their float32 parts are sized by it)."""
    return min(SPLIT_ROWS, n)


def _row_grid(n: int, rows: int) -> tuple[int]:
    """hy_forward / hy_dx grid: the CTAs of the split rows' parts, then a token per warp."""
    return (rows * ROW_PARTS // _FWD_WARPS + (n + _FWD_WARPS - 1) // _FWD_WARPS,)


def _finish_rows(part, part_l1, part_tc, order, split, out, l1_tok, tile_counts, rows, nt, gated):
    """hy_rows_finish: the split rows' float32 parts (and forward statistics) into the outputs."""
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    n, d_model = out.shape
    if rows == 0:
        return
    launch(_kernel("hy_rows_finish", out.device, d_model, gated, out.dtype), (rows,), (d_model // 8,),
           (ptr(part), ptr(part_l1), ptr(part_tc), ptr(order), ptr(split), ptr(out), ptr(l1_tok),
            ptr(tile_counts), np.int32(rows), np.int32(n), np.int32(nt)))


def _fwd_cuda(x, w_gate, w_up, w_down, width):
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    n, d_model = x.shape
    d_ff = w_up.shape[0]
    gated = w_gate is not None
    dev, dt = x.device, x.dtype
    x = _c(x)
    w_up = _c(w_up)
    wg = _c(w_gate) if gated else w_up
    fused = fused_gate_supported(x, wg)
    if fused:  # the one dense GEMM, with the TwELL pack in its epilogue (G holds overflowing tiles only)
        from sparse_llm.kernels.twell import twell_gate_pack

        g, counts, slots, _ = twell_gate_pack(x, wg, GATE_SLOTS)
    else:  # the one dense GEMM (cuBLAS)
        g = _c(ref.gate_preact(x, wg))
    wdt = _transpose16(w_down)
    nw, nt = ref.words(d_ff), ref.tiles(d_ff)
    mrow = torch.empty(n, nw, dtype=torch.int32, device=dev)
    tprefix = torch.empty(n, nt, dtype=torch.int32, device=dev)
    y = torch.empty(n, d_model, dtype=dt, device=dev)
    ell = torch.zeros(n, width, 2, dtype=torch.float32, device=dev)
    l1_tok = torch.empty(n, dtype=torch.float32, device=dev)
    tile_counts = torch.empty(n, nt, dtype=torch.int32, device=dev)
    neuron_counts = torch.zeros(d_ff, dtype=torch.int32, device=dev)
    if n > 0:
        i32 = np.int32
        if fused:
            launch(_kernel("hy_from_twell", dev, d_model, gated, dt), ((n + 7) // 8,), (256,),
                   (ptr(g), ptr(counts), ptr(slots), ptr(mrow), ptr(tprefix), ptr(ell), i32(n), i32(d_ff),
                    i32(width), i32(GATE_SLOTS)))
        else:
            launch(_kernel("hy_pack", dev, d_model, gated, dt), ((n + 7) // 8,), (256,),
                   (ptr(g), ptr(mrow), ptr(tprefix), ptr(ell), i32(n), i32(d_ff), i32(width)))
        order, split_rows = _row_plan(tprefix)
        rows = _split_bound(n)
        part_y = torch.empty(rows, ROW_PARTS, d_model, dtype=torch.float32, device=dev)
        part_l1 = torch.empty(rows, ROW_PARTS, dtype=torch.float32, device=dev)
        part_tc = torch.empty(rows, ROW_PARTS, nt, dtype=torch.int32, device=dev)
        launch(_kernel("hy_forward", dev, d_model, gated, dt), _row_grid(n, rows), (_FWD_WARPS * 32,),
               (ptr(x), ptr(g), ptr(w_up), ptr(wdt), ptr(mrow), ptr(y), ptr(ell), ptr(l1_tok),
                ptr(tile_counts), ptr(neuron_counts), ptr(order), ptr(split_rows), ptr(part_y), ptr(part_l1),
                ptr(part_tc), i32(rows), i32(n), i32(d_ff), i32(width)),
               shared_mem=_FWD_WARPS * nt * 4)
        _finish_rows(part_y, part_l1, part_tc, order, split_rows, y, l1_tok, tile_counts, rows, nt, gated)
    else:
        order, split_rows = _row_plan(tprefix)
    return y, l1_tok.sum(), tile_counts, neuron_counts, mrow, tprefix, ell, order, split_rows


def _bwd_cuda(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix, ell, neuron_counts, order, split_rows):
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    n, d_model = x.shape
    d_ff = w_up.shape[0]
    width = ell.shape[1]
    gated = w_gate is not None
    dev, dt = x.device, x.dtype
    x, dy, w_up = _c(x), _c(dy.to(dt)), _c(w_up)
    wg = _c(w_gate) if gated else w_up
    wdt = _transpose16(w_down)
    dl1 = dl1.reshape(()).to(torch.float32).contiguous()
    nw, wc = ref.words(d_ff), (n + 31) // 32
    i32 = np.int32
    mcol = torch.empty(d_ff, wc, dtype=torch.int32, device=dev)
    width_d = backward_ell_width(width, d_ff, d_model)
    part_dot = torch.empty(n, width_d, dwy_slices(d_model), dtype=torch.float32, device=dev)
    au = torch.empty(n, width_d if width_d > width else 0, 2, dtype=torch.float32, device=dev)
    dwg = torch.empty(d_ff, d_model, dtype=dt, device=dev)
    dwu = torch.empty(d_ff, d_model, dtype=dt, device=dev) if gated else None
    dwdt = torch.empty(d_ff, d_model, dtype=dt, device=dev)
    dx = torch.empty(n, d_model, dtype=dt, device=dev)
    rows = _split_bound(n)
    if n > 0:
        launch(_kernel("hy_transpose", dev, d_model, gated, dt), (-(-wc // _TR_BLOCKS), (nw + 7) // 8), (256,),
               (ptr(mrow), ptr(mcol), i32(n), i32(d_ff)))
        if width_d > width:  # rows split over warps: up to FILL_SPLIT_ROWS (it keeps no partial sums)
            fill_rows = min(FILL_SPLIT_ROWS, n)
            launch(_kernel("hy_fill_au", dev, d_model, gated, dt), _row_grid(n, fill_rows), (_FWD_WARPS * 32,),
                   (ptr(x), ptr(wg), ptr(w_up if gated else None), ptr(mrow), ptr(tprefix), ptr(au), ptr(order),
                    ptr(split_rows), i32(fill_rows), i32(n), i32(d_ff), i32(width), i32(width_d)))
    threads = d_model // 8
    # work items: units split into DW_SPLIT_TOKENS-token parts (every unit at least one item), in the
    # order hy_dw_plan writes (split units' parts first)
    part = max(DW_SPLIT_TOKENS, -(-n // 0xFFFF))  # a part's index has 16 bits in the order
    max_items = d_ff + (n * d_ff + part - 1) // part
    plan = torch.empty(2 * d_ff + 3 + max_items, dtype=torch.int32, device=dev)
    item_start = plan[:d_ff + 3]  # + the two passes' item counters (hy_dw_plan zeroes them)
    rank, dw_order = plan[d_ff + 3:2 * d_ff + 3], plan[2 * d_ff + 3:]
    launch(_kernel("hy_dw_plan", dev, d_model, gated, dt), (1,), (1024,),
           (ptr(_c(neuron_counts.to(torch.int32))), ptr(item_start), ptr(rank), ptr(dw_order), i32(d_ff), i32(part)))
    acc = torch.empty(d_ff, 3, d_model, dtype=torch.float32, device=dev)  # rows of split units only
    launch(_kernel("hy_dw_zero", dev, d_model, gated, dt), (d_ff,), (threads,), (ptr(item_start), ptr(acc), i32(d_ff)))
    sms = device_properties(dev).multi_processor_count
    weights = (ptr(x), ptr(dy), ptr(wg), ptr(w_up if gated else None), ptr(wdt), ptr(mrow), ptr(mcol), ptr(tprefix),
               ptr(ell), ptr(au))
    dims = (i32(part), i32(n), i32(d_ff), i32(width), i32(width_d))
    ring_y, ring_x = _dw_ring_bytes(d_model)
    dwy = _kernel("hy_dwy", dev, d_model, gated, dt)
    launch(dwy, (sms * resident_blocks(dwy, _DW_THREADS, ring_y),), (_DW_THREADS,),
           weights + (ptr(part_dot), ptr(dwdt), ptr(item_start), ptr(dw_order), ptr(plan[d_ff + 1:]), ptr(acc)) + dims,
           shared_mem=ring_y)
    dwx = _kernel("hy_dwx", dev, d_model, gated, dt)
    launch(dwx, (sms * resident_blocks(dwx, _DW_THREADS, ring_x),), (_DW_THREADS,),
           weights + (ptr(part_dot), ptr(dl1), ptr(dwg), ptr(dwu), ptr(item_start), ptr(dw_order),
                      ptr(plan[d_ff + 2:]), ptr(acc)) + dims, shared_mem=ring_x)
    launch(_kernel("hy_dw_finish", dev, d_model, gated, dt), (d_ff,), (threads,),
           (ptr(item_start), ptr(acc), ptr(dwg), ptr(dwu), ptr(dwdt), i32(d_ff)))
    if n > 0:
        part_dx = torch.empty(rows, ROW_PARTS, d_model, dtype=torch.float32, device=dev)
        launch(_kernel("hy_dx", dev, d_model, gated, dt), _row_grid(n, rows), (_FWD_WARPS * 32,),
               (ptr(x), ptr(dy), ptr(wg), ptr(w_up if gated else None), ptr(wdt), ptr(mrow), ptr(ell), ptr(au),
                ptr(part_dot), ptr(dl1), ptr(dx), ptr(order), ptr(split_rows), ptr(part_dx), i32(rows), i32(n),
                i32(d_ff), i32(width), i32(width_d)))
        _finish_rows(part_dx, None, None, order, split_rows, dx, None, None, rows, ref.tiles(d_ff), gated)
    dwd = _transpose16(dwdt)
    if gated:
        return dx, dwg, dwu, dwd
    return dx, None, dwg, dwd


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("sparse_llm::hybrid_ffn_fwd", mutates_args=())
def hybrid_ffn_fwd(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor, ell_width: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, l1_sum, tile_counts, neuron_counts, mrow, tprefix, ell, row_order, split_rows): the first
    seven as in hybrid_reference, the last two the row plan (`_row_plan`) for the backward."""
    if kernel_supported(x, w_gate, w_up, w_down):
        return _fwd_cuda(x, w_gate, w_up, w_down, ell_width)
    out = tuple(t.contiguous() for t in ref.forward(x, w_gate, w_up, w_down, ell_width))
    return out + _row_plan(out[5])


@hybrid_ffn_fwd.register_fake
def _(x, w_gate, w_up, w_down, ell_width):
    n = x.shape[0]
    d_ff = w_up.shape[0]
    nw, nt = ref.words(d_ff), ref.tiles(d_ff)
    i32 = dict(dtype=torch.int32, device=x.device)
    acc = ref.acc_dtype(x.dtype)
    return (x.new_empty(n, w_down.shape[0]), x.new_empty((), dtype=acc),
            x.new_empty(n, nt, **i32), x.new_empty(d_ff, **i32), x.new_empty(n, nw, **i32),
            x.new_empty(n, nt, **i32), x.new_empty(n, ell_width, 2, dtype=acc), x.new_empty(n, **i32),
            x.new_empty((), **i32))


@torch.library.custom_op("sparse_llm::hybrid_ffn_bwd", mutates_args=())
def hybrid_ffn_bwd(dy: Tensor, dl1: Tensor, x: Tensor, w_gate: Optional[Tensor], w_up: Tensor,
                   w_down: Tensor, mrow: Tensor, tprefix: Tensor, ell: Tensor, neuron_counts: Tensor,
                   row_order: Tensor, split_rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_gate (empty when w_gate is None), dw_up, dw_down) from the hybrid format; the
    forward's neuron counts and row plan only balance the work (any counts, any permutation with
    any split count give the same result)."""
    if kernel_supported(x, w_gate, w_up, w_down):
        out = _bwd_cuda(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix, ell, neuron_counts, row_order,
                        split_rows)
    else:
        out = ref.backward(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix, ell)
    dx, dwg, dwu, dwd = out
    if dwg is None:
        dwg = x.new_empty(0)
    return dx.contiguous(), dwg.contiguous(), dwu.contiguous(), dwd.contiguous()


@hybrid_ffn_bwd.register_fake
def _(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix, ell, neuron_counts, row_order, split_rows):
    dwg = torch.empty_like(w_gate) if w_gate is not None else x.new_empty(0)
    return torch.empty_like(x), dwg, torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, _ = inputs
    _, _, _, neuron_counts, mrow, tprefix, ell, row_order, split_rows = output
    ctx.gated = w_gate is not None
    ctx.save_for_backward(x, w_gate, w_up, w_down, mrow, tprefix, ell, neuron_counts, row_order, split_rows)
    ctx.mark_non_differentiable(*output[2:])
    # no zero gradients for the seven format/statistics outputs (each a fill, ell's 17 MB at 16k tokens)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dl1, *_):
    x, w_gate, w_up, w_down, mrow, tprefix, ell, neuron_counts, row_order, split_rows = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(x.shape[0], w_down.shape[0])
    if dl1 is None:
        dl1 = torch.zeros((), dtype=ell.dtype, device=x.device)
    dx, dwg, dwu, dwd = torch.ops.sparse_llm.hybrid_ffn_bwd(dy, dl1, x, w_gate, w_up, w_down, mrow, tprefix,
                                                            ell, neuron_counts, row_order, split_rows)
    return dx, (dwg if ctx.gated else None), dwu, dwd, None


hybrid_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def hybrid_ffn(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor, *,
               ell_width: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, l1_sum, tile_counts, neuron_counts) of the ReLU-gated FFN (non-gated when w_gate is None).

    x [..., d_model] (leading dims are flattened for the statistics); weights in nn.Linear layout.
    Weights of another dtype than x are cast to it first (differentiably).
    """
    d_model = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_model)
    cast = lambda w: w if w is None or w.dtype == x.dtype else w.to(x.dtype)  # noqa: E731
    w_gate, w_up, w_down = cast(w_gate), cast(w_up), cast(w_down)
    width = resolve_ell_width(ell_width, w_up.shape[0])
    y, l1_sum, tile_counts, neuron_counts, *_ = torch.ops.sparse_llm.hybrid_ffn_fwd(
        x2, w_gate, w_up, w_down, width)
    return y.reshape(*lead, w_down.shape[0]), l1_sum, tile_counts, neuron_counts


# ----------------------------------------------------------------------------------------------
# routing for kernel=auto

# Active fraction (mean active units per token / d_ff) below which the hybrid kernels beat dense
# fwd+bwd, measured by `python -m sparse_llm.kernels.bench training --sweep` (see NOTES_hybrid.md).
CROSSOVER_ACTIVE_FRAC = 0.0138  # 2026-11-25, H100, bf16, d 2048, d_ff 5632, 16384 tokens (v20; v6: 0.0093)


class HybridRouter:
    """Per-layer dense/hybrid choice with hysteresis, kept on the device.

    Each step, `observe(layer, active_frac)` folds the layer's measured active fraction (a device
    scalar, e.g. tile_counts.sum() / (N * d_ff)) into an exponential moving average and updates the
    layer's device-side decision: switch to hybrid when the average falls below
    `crossover * (1 - band)`, back to dense when it rises above `crossover` (so the hybrid path
    never runs where it measured slower than dense, and the band stops flapping). Nothing
    here reads the device. The host copy `use_hybrid` (what the model reads each step) changes only
    in `sync()`, which the trainer calls at log intervals, where it synchronises anyway; between
    syncs the model runs on the last synced decision, so a step never waits for the device.
    All layers start dense (the active fraction of a fresh ReLU layer is about one half).
    """

    def __init__(self, num_layers: int, device="cpu", crossover: float = CROSSOVER_ACTIVE_FRAC,
                 band: float = 0.25, momentum: float = 0.9):
        if not 0 <= band < 1 or not 0 <= momentum < 1 or crossover <= 0:
            raise ValueError("HybridRouter needs crossover > 0, 0 <= band < 1, 0 <= momentum < 1")
        self.crossover, self.band, self.momentum = crossover, band, momentum
        self.ema = torch.ones(num_layers, dtype=torch.float32, device=device)
        self.on = torch.zeros(num_layers, dtype=torch.bool, device=device)
        self.use_hybrid = [False] * num_layers

    @property
    def low(self) -> float:
        return self.crossover * (1 - self.band)

    @property
    def high(self) -> float:
        return self.crossover

    @torch.no_grad()
    def observe(self, layer: int, active_frac: Tensor) -> None:
        frac = active_frac.detach().reshape(()).to(self.ema.device, torch.float32)
        ema = self.ema[layer] * self.momentum + frac * (1 - self.momentum)
        self.ema[layer] = ema
        self.on[layer] = torch.where(self.on[layer], ema < self.high, ema < self.low)

    def sync(self) -> list[bool]:
        """Read the device decisions into `use_hybrid` (one small device-to-host copy)."""
        self.use_hybrid = [bool(v) for v in self.on.tolist()]
        return self.use_hybrid

    def kernel_for(self, layer: int) -> str:
        return "hybrid" if self.use_hybrid[layer] else "dense"

    def state_dict(self) -> dict:
        return {"ema": self.ema.clone(), "on": self.on.clone(), "use_hybrid": list(self.use_hybrid)}

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(state["ema"])
        self.on.copy_(state["on"])
        self.use_hybrid = list(state["use_hybrid"])
