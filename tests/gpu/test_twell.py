"""TwELL inference kernels on a GPU, against the float32 reference and the CPU format oracle.

Fresh random inputs every run (the seed is in each failure message); outputs are poisoned with NaN
before the kernels run where the test owns the buffer.
Run: PYTHONPATH=$PWD python -m pytest -m gpu tests/gpu/test_twell.py -q
"""
import os

import pytest
import torch

from sparse_llm.kernels import twell
from sparse_llm.kernels import twell_reference as tr
from sparse_llm.kernels.reference import ffn_hidden, ffn_reference_fp32
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from tests.gpu.helpers import rel

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _seed():
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _assert_stats(stats, x, w_gate, tile, slots, seed):
    """Overflow statistics equal those of the pack of cuBLAS's G; where the fused gate kernel (its own
    summation order) made G, a unit within rounding of zero may fall on the other side, moving at
    most a tile or two (or 0.1%) across the overflow line."""
    expected = tr.pack_twell(torch.matmul(x, w_gate.t()).cpu(), tile, slots).stats().tolist()
    got = stats.cpu().tolist()
    fused = twell.current_config().gate_kernel and twell.gate_kernel_supported(x.device, x.dtype, tile, slots)
    if not fused:
        assert got == expected, f"seed {seed}"
        return
    slack = max(2, expected[0] // 1000)
    assert abs(got[0] - expected[0]) <= slack, f"seed {seed}: {got} vs {expected}"
    assert abs(got[1] - expected[1]) <= slack * tile, f"seed {seed}: {got} vs {expected}"


def _adversarial_gate(n, d_ff, tile, slots, dtype, seed):
    """Random ~1% gate with adversarial rows: all zero, fully dense, every tile exactly full,
    one tile over by one, one tile fully dense, and NaN-free negative rows."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    gate = torch.randn(n, d_ff, generator=g, device=DEV)
    mask = torch.rand(n, d_ff, generator=g, device=DEV) < 0.01
    gate = torch.where(mask, gate.abs() + 0.05, -gate.abs() - 0.05)
    nt = tr.num_tiles(d_ff, tile)
    gate[0] = -1.0  # no active unit
    gate[1] = gate[1].abs() + 0.1  # every unit active: every tile overflows
    for k in range(nt):  # every tile exactly full
        w = min(tile, d_ff - k * tile)
        gate[2, k * tile: k * tile + w] = -1.0
        cols = k * tile + torch.randperm(w, generator=g, device=DEV)[: min(slots, w)]
        gate[2, cols] = 1.0 + torch.rand(len(cols), generator=g, device=DEV)
    gate[3, tile: tile + slots + 1] = 2.0  # one tile over by one
    gate[4, :tile] = 0.5  # one tile fully dense
    gate[n // 2:: 97] = -0.3  # scattered empty rows
    return gate.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_matches_reference(dtype):
    seed = _seed()
    n, d_ff, tile, slots = 1000, 2816, 256, 32
    gate = _adversarial_gate(n, d_ff, tile, slots, dtype, seed)
    counts, packed, stats = twell.twell_pack(gate, tile, slots)
    ref = tr.pack_twell(gate.cpu(), tile, slots)
    assert torch.equal(counts.cpu(), ref.counts), f"seed {seed}"
    valid = ref.valid_mask()
    assert torch.equal(packed.cpu()[valid], ref.slots[valid]), f"seed {seed}"
    assert stats.cpu().tolist() == ref.stats().tolist(), f"seed {seed}"
    assert ref.overflow[1].all() and not ref.overflow[2].any() and ref.overflow[3, 1] and ref.overflow[4, 0]


def _adversarial_problem(dtype, n, d_model, d_ff, tile, slots, seed):
    """(gate, x, w_up, w_down): an adversarial gate (`_adversarial_gate`) and random inputs and weights."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    gate = _adversarial_gate(n, d_ff, tile, slots, dtype, seed)
    x = torch.randn(n, d_model, generator=g, device=DEV).to(dtype)
    w_up = (torch.randn(d_ff, d_model, generator=g, device=DEV) / d_model**0.5).to(dtype)
    w_down = (torch.randn(d_model, d_ff, generator=g, device=DEV) / d_ff**0.5).to(dtype)
    return gate, x, w_up, w_down


ADVERSARIAL_SHAPES = [
    (torch.bfloat16, 1000, 1024, 2816, 256, 32),
    (torch.float16, 127, 1024, 2816, 512, 8),
    (torch.bfloat16, 301, 1088, 2112, 256, 16),  # d_model, d_ff multiples of 64 only; partial last tile
]


@pytest.mark.parametrize("gated,up_blocked", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype,n,d_model,d_ff,tile,slots", ADVERSARIAL_SHAPES)
def test_fused_adversarial_poisoned(gated, up_blocked, dtype, n, d_model, d_ff, tile, slots):
    seed = _seed()
    gate, x, w_up, w_down = _adversarial_problem(dtype, n, d_model, d_ff, tile, slots, seed)
    counts, packed, _ = twell.twell_pack(gate, tile, slots)
    y = torch.full((n, d_model), float("nan"), dtype=dtype, device=DEV)
    if up_blocked:  # h in the slots from the token-blocked kernel, overflowing tiles from the gate rows
        config = twell.FusedConfig(up_blocked=1, up_tokens=100)  # blocks of 100: the last one partial
        assert twell.up_blocked_supported(x.device, d_model, d_ff, tile, slots, config)
        h_slots = twell.twell_up_blocked(x, counts, packed, w_up, tile, config=config)
        twell.twell_ffn_packed(x, gate, counts, h_slots, w_up, w_down.t().contiguous(), tile, out=y, hslots=True)
    else:
        twell.twell_ffn_packed(x, gate, counts, packed, w_up if gated else None, w_down.t().contiguous(), tile, out=y)
    h = torch.relu(gate.float())
    if gated:
        h = h * (x.float() @ w_up.float().t())
    ref = h @ w_down.float().t()
    assert torch.isfinite(y).all(), f"seed {seed}: unwritten or non-finite outputs"
    assert (y[0] == 0).all(), f"seed {seed}: a token with no active unit must give y = 0"
    err = rel(y, ref)
    assert err < 1e-2, f"seed {seed}: rel err {err}"
    row_err = (y.float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-6)
    assert row_err[1:5].max().item() < 2e-2, f"seed {seed}: adversarial rows {row_err[1:5].tolist()}"


def _h_of_slots(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit values in the upper halves of slot words, as float32."""
    bits = (words >> 16) & 0xFFFF
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(dtype).float()


@pytest.mark.parametrize("dtype,n,d_model,d_ff,tile,slots", ADVERSARIAL_SHAPES + [(torch.bfloat16, 700, 2048, 5632, 256, 32)])
@pytest.mark.parametrize("up_tokens,pair_cap", [(256, 0), (77, 0), (256, -1)])  # -1: one token's slots a round
def test_up_blocked_vs_fp32(dtype, n, d_model, d_ff, tile, slots, up_tokens, pair_cap):
    """h = g * (x . Wu[j]) in every stored slot of a non-overflowing tile; every other slot untouched."""
    seed = _seed()
    gate, x, w_up, _ = _adversarial_problem(dtype, n, d_model, d_ff, tile, slots, seed)
    counts, packed, _ = twell.twell_pack(gate, tile, slots)
    nt = tr.num_tiles(d_ff, tile)
    config = twell.FusedConfig(up_blocked=1, up_tokens=up_tokens, up_pair_cap=nt * slots if pair_cap < 0 else pair_cap)
    assert twell.up_blocked_supported(x.device, d_model, d_ff, tile, slots, config)
    poison = torch.full_like(packed, 0x7FC07FC0)
    out = twell.twell_up_blocked(x, counts, packed, w_up, tile, out=poison.clone(), config=config)
    stored = torch.arange(slots, device=DEV).view(1, 1, slots) < counts.clamp_max(slots).unsqueeze(-1)
    overflow = (counts > slots).unsqueeze(-1).expand_as(stored)
    written = stored & ~overflow
    assert torch.equal(out[~written], poison[~written]), f"seed {seed}: a slot outside the stored pairs was written"
    assert torch.equal(out[written] & 0xFFFF, packed[written] & 0xFFFF), f"seed {seed}: columns changed"
    token, tile_k, _ = written.nonzero(as_tuple=True)
    unit = tile_k * tile + (packed[written] & 0xFFFF)
    u = (x[token].float() * w_up[unit].float()).sum(-1)
    h_ref = _h_of_slots(packed[written], dtype) * u
    h = _h_of_slots(out[written], dtype)
    assert torch.isfinite(h).all(), f"seed {seed}"
    err = (h - h_ref).abs() / (h_ref.abs() + 1e-3 * h_ref.abs().max())
    assert err.max().item() < 1e-2, f"seed {seed}: worst relative error of h {err.max().item()}"
    # in place gives the same words
    in_place = packed.clone()
    twell.twell_up_blocked(x, counts, in_place, w_up, tile, out=in_place, config=config)
    assert torch.equal(in_place[written], out[written]), f"seed {seed}"


CASES = [  # d_model, d_ff, tokens, dtype, gated, tail, tile, slots
    (1024, 2816, 1, torch.bfloat16, True, 0.0, 256, 32),
    (1024, 2816, 127, torch.float16, True, 0.15, 256, 32),
    (1024, 2816, 1000, torch.bfloat16, False, 0.1, 256, 32),
    (2048, 5632, 1000, torch.bfloat16, True, 0.2, 256, 32),
    (2048, 5632, 333, torch.float16, True, 0.0, 256, 4),  # many overflowing tiles
    (2048, 8192, 257, torch.bfloat16, True, 0.1, 512, 32),
    (4096, 11008, 257, torch.bfloat16, True, 0.15, 256, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-n{c[2]}-{str(c[3])[6:]}-{'g' if c[4] else 'ng'}-s{c[7]}")
def test_twell_ffn_vs_fp32(case):
    d_model, d_ff, n, dtype, gated, tail, tile, slots = case
    seed = _seed()
    mean_active = float(torch.empty(1).uniform_(0.003, 0.03).item()) * d_ff
    syn = make_synthetic_ffn(n, d_model, d_ff, mean_active, tail, dtype, DEV, seed)
    w_gate, w_up = (syn.w_gate, syn.w_up) if gated else (None, syn.w_gate)
    x = syn.x.view(1, n, d_model)
    y, stats = twell.twell_ffn(x, w_gate, w_up, syn.w_down, tile=tile, slots=slots, return_stats=True)
    ref = ffn_reference_fp32(x, w_gate, w_up, syn.w_down)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all(), f"seed {seed}"
    err = rel(y, ref)
    assert err < 1e-2, f"seed {seed}: rel err {err} (mean active {mean_active:.1f})"
    _assert_stats(stats, syn.x, w_gate if gated else w_up, tile, slots, seed)


def test_scan_variant_and_configs():
    seed = _seed()
    syn = make_synthetic_ffn(555, 2048, 5632, 40, 0.2, torch.bfloat16, DEV, seed)
    ref = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
    try:
        for cfg in [twell.FusedConfig(scan=1), twell.FusedConfig(slice_width=2048, group=1, regs=255),
                    twell.FusedConfig(slice_width=512, group=4, regs=96, hints=0),
                    twell.FusedConfig(group=2, regs=168, prefetch=0), twell.FusedConfig(passes=3, grid_fill=0.3),
                    twell.FusedConfig(passes=2, scan=1, pack_unroll=8), twell.FusedConfig(up_blocked=1),
                    twell.FusedConfig(up_blocked=1, up_tokens=32),
                    twell.FusedConfig(up_blocked=1, up_tokens=200, passes=2),
                    twell.FusedConfig(passes=3, pass_partial16=1), twell.FusedConfig(passes=2, pass_partial16=1, scan=1)]:
            twell.set_default_config(cfg)
            y = twell.twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down)
            assert rel(y, ref) < 1e-2, f"seed {seed}: {cfg}"
    finally:
        twell.set_default_config(None)


def test_lpt_order_and_passes():
    seed = _seed()
    syn = make_synthetic_ffn(12345, 1024, 2816, 25, 0.2, torch.bfloat16, DEV, seed)
    ref = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
    try:
        for cfg in [twell.FusedConfig(lpt=0), twell.FusedConfig(lpt=1, passes=2, grid_fill=0.5),
                    twell.FusedConfig(lpt=1, passes=3, slice_width=512, regs=96),
                    twell.FusedConfig(lpt=1, passes=2, pass_partial16=1)]:
            twell.set_default_config(cfg)
            y, stats = twell.twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down, slots=8, return_stats=True)
            assert torch.isfinite(y).all() and rel(y, ref) < 1e-2, f"seed {seed}: {cfg}"
            _assert_stats(stats, syn.x, syn.w_gate, 256, 8, seed)
    finally:
        twell.set_default_config(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_passes_from_16bit_partials_match_float32_partials(dtype):
    # pass_partial16 rounds each pass's running y once more: element by element within half a 16-bit
    # ulp of every partial it rounded (the running sums after the first and second of 3 passes, whose
    # size can exceed the final element's and its row's largest: an element that cancels in the last
    # pass still carries the earlier roundings) plus each output's final rounding; and both within the
    # usual tolerance of the float32 reference. The partials come from the float32 reference's h
    # (1.5x for the kernel's own rounding of h). The bound was 3 eps x the row's largest element until
    # seed 2046946184 (fp16) put a 2^-9 difference past it.
    seed = _seed()
    syn = make_synthetic_ffn(3001, 2048, 5632, 29, 0.2, dtype, DEV, seed)
    ref = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
    outputs = {}
    passes = 3
    try:
        for partial16 in (0, 1):
            twell.set_default_config(twell.FusedConfig(passes=passes, pass_partial16=partial16))
            outputs[partial16] = twell.twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down)
    finally:
        twell.set_default_config(None)
    for y in outputs.values():
        assert rel(y, ref) < 1e-2, f"seed {seed}"
    h = ffn_hidden(syn.x.float(), syn.w_gate.float(), syn.w_up.float())
    ranges = twell.pass_tile_ranges(tr.num_tiles(h.shape[1], tr.DEFAULT_TILE), passes)
    ends = [last * tr.DEFAULT_TILE for _, last in ranges[:-1]]  # the rounded running partials' units
    partials = sum(((h[:, :end] @ syn.w_down.float()[:, :end].t()).abs() for end in ends), torch.zeros_like(ref))
    eps = torch.finfo(dtype).eps
    diff = (outputs[1].float() - outputs[0].float()).abs()
    bound = eps * (0.5 * 1.5 * partials + ref.abs() + 2 * torch.finfo(dtype).tiny)  # tiny * eps: a subnormal ulp
    assert (diff <= bound).all(), f"seed {seed}: {(diff - bound).max()} past the bound"


@pytest.mark.parametrize("gated", [True, False])
def test_long_rows_split_over_parts(gated):
    # ~300 rows of 200-3000 active units among rows of ~29 (as the first positions of a sequence in a
    # trained model): split over row_parts teams (twell_ffn.cu, "Long rows") or not, every config
    # within tolerance of the float32 reference and within two 16-bit roundings of the unsplit walk
    seed = _seed()
    syn = make_synthetic_ffn(2001, 2048, 5632, 29, 0.1, torch.bfloat16, DEV, seed)
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = syn.x.clone()
    long_rows = torch.randperm(x.shape[0], generator=g, device=DEV)[:300]
    scale = 1.5 + 6 * torch.rand(300, 1, generator=g, device=DEV)
    x[long_rows, 1:] = (x[long_rows, 1:].float() * scale).to(x.dtype)  # feature 0 (the threshold) unscaled
    w_gate, w_up = (syn.w_gate, syn.w_up) if gated else (None, syn.w_gate)
    lengths = (torch.nn.functional.linear(x.float(), (w_gate if gated else w_up).float()) > 0).sum(1)
    assert (lengths >= 128).sum() > 256 and lengths.max() > 1000, f"seed {seed}: rows too short"
    ref = ffn_reference_fp32(x, w_gate, w_up, syn.w_down)
    configs = [twell.FusedConfig(split_rows=0), twell.FusedConfig(), twell.FusedConfig(split_rows=5),
               twell.FusedConfig(row_parts=3, passes=3), twell.FusedConfig(row_parts=16, passes=2, pass_partial16=0),
               twell.FusedConfig(row_parts=1), twell.FusedConfig(slice_width=512, regs=96, split_units=600)]
    if gated:
        configs.append(twell.FusedConfig(up_blocked=1))
    outputs = []
    try:
        for cfg in configs:
            twell.set_default_config(cfg)
            y = twell.twell_ffn(x, w_gate, w_up, syn.w_down)
            assert torch.isfinite(y).all() and rel(y, ref) < 1e-2, f"seed {seed}: {cfg}"
            outputs.append((cfg, y))
    finally:
        twell.set_default_config(None)
    eps = torch.finfo(torch.bfloat16).eps
    unsplit = outputs[0][1].float()
    for cfg, y in outputs[1:3]:  # same passes as the unsplit walk: only the summation order differs
        diff = (y.float() - unsplit).abs()
        assert (diff <= 2 * eps * ref.abs() + 1e-3 * ref.abs().max()).all(), f"seed {seed}: {cfg}"


@pytest.mark.parametrize("lpt", [0, 1])
def test_cuda_graph_capture_and_replay(lpt):
    seed = _seed()
    twell.set_default_config(twell.FusedConfig(lpt=lpt, passes=2 if lpt else 0, up_blocked=1 - lpt))
    try:
        _graph_check(seed, 1000)
    finally:
        twell.set_default_config(None)


def _graph_check(seed, n):
    syn = make_synthetic_ffn(n, 1024, 2816, 20, 0.15, torch.bfloat16, DEV, seed)
    w_dt = syn.w_down.t().contiguous()
    static_x = syn.x.clone()
    run = lambda: twell.twell_ffn(static_x, syn.w_gate, syn.w_up, None, w_down_t=w_dt)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run()
    for scale in (1.0, 1.7):
        new_x = syn.x.flip(0) * scale
        static_x.copy_(new_x)
        graph.replay()
        eager = twell.twell_ffn(new_x, syn.w_gate, syn.w_up, None, w_down_t=w_dt)
        torch.cuda.synchronize()
        assert torch.equal(static_y, eager), f"seed {seed}"
        assert rel(static_y, ffn_reference_fp32(new_x, syn.w_gate, syn.w_up, syn.w_down)) < 1e-2


@pytest.mark.parametrize("gated", [True, False])
def test_opcheck(gated):
    syn = make_synthetic_ffn(33, 256, 512, 8, 0.1, torch.bfloat16, DEV, _seed())
    args = (syn.x.view(3, 11, 256), syn.w_gate if gated else None, syn.w_up, syn.w_down.t().contiguous(), 256, 32)
    torch.library.opcheck(torch.ops.sparse_llm.twell_ffn.default, args)


def test_empty_and_shape_errors():
    syn = make_synthetic_ffn(4, 256, 512, 8, 0.0, torch.bfloat16, DEV, _seed())
    y = twell.twell_ffn(syn.x[:0], syn.w_gate, syn.w_up, syn.w_down)
    assert y.shape == (0, 256)
    with pytest.raises(ValueError):
        twell.twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down, slots=65)


# ---------------------------------------------------------------------------------------------
# The fused gate GEMM + pack kernel (twell_gate.cu, Hopper only)
def _gate_kernel_here() -> bool:
    return torch.cuda.is_available() and twell.gate_kernel_supported(torch.device(DEV), torch.bfloat16, 256, 32)


hopper_only = pytest.mark.skipif(not _gate_kernel_here(), reason="twell_gate.cu needs a Hopper GPU (sm_90a)")


def _check_gate_pack(x, w_gate, slots, seed, config=None):
    """The kernel's pack equals twell_pack of the G it computed (written whole with write_all), that G
    matches the float32 product, and the overflow-only mode writes the same pack and the same G
    wherever a tile overflows."""
    n, d_ff = x.shape[0], w_gate.shape[0]
    total = torch.zeros(n, dtype=torch.int32, device=DEV)
    gate, counts, packed, stats = twell.twell_gate_pack(x, w_gate, slots, row_total=total, write_all=True,
                                                        config=config)
    ref = x.float() @ w_gate.float().t()
    assert torch.isfinite(gate).all(), f"seed {seed}: unwritten G"
    tol = 1e-2 * ref.abs() + 1e-2 * ref.abs().max()
    assert ((gate.float() - ref).abs() <= tol).all(), f"seed {seed}: G differs from the float32 product"
    expect = tr.pack_twell(gate.cpu(), 256, slots)
    assert torch.equal(counts.cpu(), expect.counts), f"seed {seed}"
    valid = expect.valid_mask()
    assert torch.equal(packed.cpu()[valid], expect.slots[valid]), f"seed {seed}"
    assert stats.cpu().tolist() == expect.stats().tolist(), f"seed {seed}"
    assert torch.equal(total.cpu(), expect.counts.sum(1).int()), f"seed {seed}"
    gate2, counts2, packed2, stats2 = twell.twell_gate_pack(x, w_gate, slots, config=config)
    assert torch.equal(counts2, counts) and torch.equal(stats2, stats), f"seed {seed}"
    assert torch.equal(packed2.cpu()[valid], expect.slots[valid]), f"seed {seed}"
    over = expect.overflow.repeat_interleave(256, dim=1)[:, :d_ff].to(DEV)
    assert torch.equal(gate2[over], gate[over]), f"seed {seed}: overflowing tiles' dense rows"
    return expect


@hopper_only
@pytest.mark.parametrize("dtype,n,d_model,d_ff,slots,tail", [
    (torch.bfloat16, 1000, 2048, 5632, 32, 0.2),
    (torch.float16, 127, 1024, 2816, 8, 0.1),
    (torch.bfloat16, 333, 1088, 2112, 16, 0.0),  # partial last tile, d_model not a multiple of 128
    (torch.bfloat16, 1, 4096, 11008, 32, 0.0),
    (torch.bfloat16, 12345, 1024, 2816, 4, 0.15),  # many overflowing tiles
])
def test_gate_kernel_matches_pack(dtype, n, d_model, d_ff, slots, tail):
    seed = _seed()
    mean_active = float(torch.empty(1).uniform_(0.003, 0.03).item()) * d_ff
    syn = make_synthetic_ffn(n, d_model, d_ff, mean_active, tail, dtype, DEV, seed)
    _check_gate_pack(syn.x, syn.w_gate, slots, seed)


@hopper_only
@pytest.mark.parametrize("dtype,cluster,stages", [(torch.bfloat16, 2, 4), (torch.float16, 2, 4),
                                                  (torch.bfloat16, 1, 3), (torch.bfloat16, 4, 4)])
def test_gate_kernel_adversarial(dtype, cluster, stages):
    """G = one-hot rows of x times W: each row of G is exactly a chosen row of the adversarial gate
    (all zero, fully dense, every tile exactly full, one tile over by one, one tile dense)."""
    seed = _seed()
    d_model, d_ff, slots, n = 1024, 2816, 32, 700
    pattern = _adversarial_gate(d_model, d_ff, 256, slots, dtype, seed)
    g = torch.Generator(device=DEV).manual_seed(seed)
    pick = torch.cat([torch.arange(8, device=DEV), torch.randint(0, d_model, (n - 8,), generator=g, device=DEV)])
    x = torch.nn.functional.one_hot(pick, d_model).to(dtype)
    x[600:] = 0  # rows with no product at all
    config = twell.FusedConfig(gate_cluster=cluster, gate_stages=stages)
    expect = _check_gate_pack(x, pattern.t().contiguous(), slots, seed, config)
    assert expect.overflow[1].all() and not expect.overflow[2].any() and expect.overflow[3, 1]
    assert (expect.counts[600:] == 0).all()


@hopper_only
def test_gate_kernel_pipeline_matches_cublas_path():
    """The whole FFN through the fused gate kernel equals the cuBLAS + twell_pack pipeline within
    rounding, on the same inputs."""
    seed = _seed()
    syn = make_synthetic_ffn(4099, 2048, 5632, 40, 0.2, torch.bfloat16, DEV, seed)
    ref = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
    outs = []
    try:
        for gate_kernel in (1, 0):
            twell.set_default_config(twell.FusedConfig(gate_kernel=gate_kernel))
            y = twell.twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down)
            assert rel(y, ref) < 1e-2, f"seed {seed}: gate_kernel={gate_kernel}"
            outs.append(y)
    finally:
        twell.set_default_config(None)
    assert rel(outs[0], outs[1]) < 5e-3, f"seed {seed}"
