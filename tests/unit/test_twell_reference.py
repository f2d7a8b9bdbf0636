"""CPU tests of the TwELL format oracle (kernels/twell_reference.py), the CPU path of the custom op,
and an nvcc compile of every TwELL CUDA source for sm_90a and sm_80."""
import re
import shutil

import pytest
import torch

from sparse_llm.kernels import twell
from sparse_llm.kernels import twell_reference as tr
from sparse_llm.kernels.loader import CUDA_DIR, nvcc_compile_check
from sparse_llm.kernels.reference import ffn_reference_fp32


def _sparse_gate(n, d_ff, frac, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, d_ff, generator=g)
    mask = torch.rand(n, d_ff, generator=g) < frac
    return torch.where(mask, gate.abs() + 0.01, -gate.abs()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_ff,tile,slots,frac", [(2816, 256, 32, 0.01), (320, 256, 4, 0.05),
                                                   (1024, 512, 8, 0.03), (5632, 256, 1, 0.004)])
def test_round_trip(dtype, d_ff, tile, slots, frac):
    gate = _sparse_gate(37, d_ff, frac, dtype, seed=d_ff + slots)
    packed = tr.pack_twell(gate, tile, slots)
    nt = tr.num_tiles(d_ff, tile)
    assert packed.counts.shape == (37, nt) and packed.slots.shape == (37, nt, slots)
    assert torch.equal(tr.unpack_twell(packed, gate), torch.relu(gate))
    # the backup is read only for overflowing tiles: a NaN backup leaves every other tile exact
    poisoned = tr.unpack_twell(packed, torch.full_like(gate, float("nan")))
    ok = ~packed.overflow.repeat_interleave(tile, 1)[:, :d_ff]
    assert torch.equal(poisoned[ok], torch.relu(gate)[ok])


def test_slot_encoding_and_order():
    gate = torch.zeros(1, 512, dtype=torch.bfloat16)
    gate[0, 300] = 1.5
    gate[0, 260] = 2.0
    gate[0, 7] = -1.0
    packed = tr.pack_twell(gate, 256, 4)
    assert packed.counts.tolist() == [[0, 2]]
    bits = lambda v: torch.tensor([v], dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF  # noqa: E731
    assert packed.slots[0, 1, :2].tolist() == [(bits(2.0) << 16) | 4, (bits(1.5) << 16) | 44]


def test_overflow_accounting():
    n, d_ff, tile, slots = 6, 1024, 256, 8
    gate = torch.full((n, d_ff), -1.0, dtype=torch.bfloat16)
    gate[1] = 1.0  # fully dense row: every tile overflows
    gate[2, :slots] = 1.0  # exactly full tile: no overflow
    gate[3, 256: 256 + slots + 1] = 3.0  # one tile over by one
    gate[4, ::2] = 0.5  # every tile at half density (128 > slots)
    # row 0 and 5: all zero (no active unit)
    packed = tr.pack_twell(gate, tile, slots)
    assert packed.counts[0].tolist() == [0, 0, 0, 0] and packed.counts[5].tolist() == [0, 0, 0, 0]
    assert packed.counts[1].tolist() == [256] * 4
    assert packed.counts[2].tolist() == [slots, 0, 0, 0]
    assert packed.counts[3].tolist() == [0, slots + 1, 0, 0]
    assert packed.counts[4].tolist() == [128] * 4
    assert packed.overflow.sum().item() == 4 + 1 + 4
    assert packed.stats().tolist() == [9, 4 * 256 + slots + 1 + 4 * 128]
    assert torch.equal(tr.unpack_twell(packed, gate), torch.relu(gate))
    with pytest.raises(ValueError, match="dense backup"):
        tr.unpack_twell(packed, None)


@pytest.mark.parametrize("gated", [True, False])
def test_reference_ffn_matches_fp32(gated):
    g = torch.Generator().manual_seed(1)
    d_model, d_ff = 128, 320
    x = torch.randn(2, 9, d_model, generator=g).bfloat16()
    wg = (torch.randn(d_ff, d_model, generator=g) / d_model**0.5).bfloat16() if gated else None
    wu = (torch.randn(d_ff, d_model, generator=g) / d_model**0.5).bfloat16()
    wd = (torch.randn(d_model, d_ff, generator=g) / d_ff**0.5).bfloat16()
    y, stats = tr.twell_ffn_reference(x, wg, wu, wd, tile=256, slots=4)
    ref = ffn_reference_fp32(x, wg, wu, wd)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2
    assert stats[0].item() > 0  # dense-ish synthetic data: some tiles overflow, still exact


def test_cpu_op_and_opcheck():
    g = torch.Generator().manual_seed(2)
    d_model, d_ff = 64, 256
    x = torch.randn(3, 5, d_model, generator=g).bfloat16()
    wg = (torch.randn(d_ff, d_model, generator=g) / 8).bfloat16()
    wu = (torch.randn(d_ff, d_model, generator=g) / 8).bfloat16()
    wd = (torch.randn(d_model, d_ff, generator=g) / 16).bfloat16()
    y = twell.twell_ffn(x, wg, wu, wd, slots=8)
    ref = ffn_reference_fp32(x, wg, wu, wd)
    assert y.shape == x.shape and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    torch.library.opcheck(torch.ops.sparse_llm.twell_ffn.default, (x, wg, wu, wd.t().contiguous(), 256, 8))
    torch.library.opcheck(torch.ops.sparse_llm.twell_ffn.default, (x, None, wu, wd.t().contiguous(), 256, 32))
    with pytest.raises(ValueError, match="multiples of 64"):
        twell.twell_ffn(x[..., :48], wg[:, :48], wu[:, :48], wd[:48])


def test_dispatch_threshold():
    f = twell.crossover_active_fraction(2048, 5632)
    assert 0.0 < f < 0.2
    assert twell.twell_is_faster(f / 2, 2048, 5632) and not twell.twell_is_faster(f * 2, 2048, 5632)
    assert twell.twell_is_faster(f / 2, 2048, 5632, tokens=131072)
    assert not twell.twell_is_faster(f / 2, 1024, 2816, tokens=1024)  # launch-bound: dense
    assert 0.0 < twell.crossover_active_fraction(3072, 8192) < 0.2  # unmeasured shape: nearest measured


TWELL_SOURCES = sorted(p.name for p in CUDA_DIR.glob("twell*.cu"))


def _spills(report: str) -> int:
    return sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", report))


_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: CUDA toolkit needed to compile-check")
# (source, arch): the gate kernel is Hopper-only (wgmma, TMA, setmaxnreg)
COMPILE_CASES = [(src, arch) for src in TWELL_SOURCES for arch in ("sm_90a", "sm_80")
                 if not (src == "twell_gate.cu" and arch != twell.GATE_KERNEL_ARCH)]


def _variants(source):
    if source == "twell_pack.cu":
        return [twell.pack_defines(256, 32, torch.bfloat16), twell.pack_defines(512, 16, torch.float16)]
    if source == "twell_up.cu":
        return [twell.up_defines(2048, 256, 32, torch.bfloat16), twell.up_defines(1088, 512, 8, torch.float16)]
    if source == "twell_gate.cu":
        return [twell.gate_defines(32, torch.bfloat16), twell.gate_defines(8, torch.float16, stages=3, cluster=1),
                twell.gate_defines(64, torch.bfloat16, cluster=4, write_all=True)]
    return [twell.fused_defines(dm, 256, 32, gated, dt, hslots=hslots)
            for dm, gated, dt, hslots in [(2048, True, torch.bfloat16, False), (4096, True, torch.bfloat16, False),
                                          (1024, False, torch.float16, False), (1088, True, torch.bfloat16, False),
                                          (2048, True, torch.bfloat16, True), (1088, True, torch.float16, True)]]


@_NVCC
@pytest.mark.parametrize("source,arch", COMPILE_CASES)
def test_nvcc_compiles(source, arch):
    assert TWELL_SOURCES == ["twell_ffn.cu", "twell_gate.cu", "twell_pack.cu", "twell_up.cu"]
    for defines in _variants(source):
        report = nvcc_compile_check(source, arch, defines)
        if arch == "sm_90a" and defines.get("TW_DMODEL", 2048) % 1024 == 0:
            assert _spills(report) == 0, f"{source} {defines} spills registers:\n{report}"
        if source == "twell_gate.cu":  # ptxas serialises the wgmma pipeline when registers run short
            assert "C7511" not in report and "C7519" not in report, f"{defines}:\n{report}"


def test_blocked_up_projection_errors_name_the_limit():
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(256, 64, dtype=torch.bfloat16)
    counts = torch.zeros(4, 1, dtype=torch.int32)
    cases = [(torch.zeros(4, 1, 6, dtype=torch.int32), twell.FusedConfig(), "multiple of 4"),
             (torch.zeros(4, 1, 8, dtype=torch.int32), twell.FusedConfig(up_tokens=300), "up_tokens"),
             (torch.zeros(4, 1, 8, dtype=torch.int32), twell.FusedConfig(), "CUDA only")]
    for packed, config, message in cases:
        with pytest.raises(ValueError, match=message):
            twell.twell_up_blocked(x, counts, packed, w, config=config)
    with pytest.raises(ValueError, match="at most 16384"):
        twell.twell_up_blocked(x, counts, torch.zeros(4, 1, 8, dtype=torch.int32), torch.zeros(16448, 64))
    assert not twell.up_blocked_supported(torch.device("cpu"), 64, 256, 256, 8, twell.FusedConfig(up_blocked=1))
    assert not twell.up_blocked_supported(torch.device("cuda"), 64, 256, 256, 8, twell.FusedConfig(up_blocked=0))


def test_gate_kernel_config_errors_name_the_field():
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(256, 64, dtype=torch.bfloat16)
    for bad in (twell.FusedConfig(gate_stages=5), twell.FusedConfig(gate_cluster=3)):
        with pytest.raises(ValueError, match="gate_stages|gate_cluster"):
            twell.twell_gate_pack(x, w, config=bad)
    assert not twell.gate_kernel_supported(torch.device("cpu"), torch.bfloat16, 256, 32)
    assert twell.gate_shared_bytes(4) <= 232448 < twell.gate_shared_bytes(5)


def test_long_row_split_config_errors_name_the_field():
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(256, 64, dtype=torch.bfloat16)
    gate, counts = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(4, 1, dtype=torch.int32)
    packed = torch.zeros(4, 1, 8, dtype=torch.int32)
    for bad in (twell.FusedConfig(row_parts=0), twell.FusedConfig(row_parts=65), twell.FusedConfig(split_rows=-1),
                twell.FusedConfig(split_units=0)):
        with pytest.raises(ValueError, match="FusedConfig.row_parts .* split_rows .* split_units"):
            twell.twell_ffn_packed(x, gate, counts, packed, w, w, config=bad)
    assert twell.fused_defines(2048, 256, 32, True, torch.bfloat16, twell.FusedConfig(row_parts=3))["TW_PARTS"] == 3


@pytest.mark.parametrize("nt,passes", [(44, 3), (44, 1), (44, 50), (1, 3), (10, 4), (9, 4), (22, 2)])
def test_pass_tile_ranges_cover_the_tiles_in_equal_passes(nt, passes):
    # the fused stage's passes (and the GPU test's bound on their rounded partials) take these ranges
    ranges = twell.pass_tile_ranges(nt, passes)
    assert ranges[0][0] == 0 and ranges[-1][1] == nt and len(ranges) <= min(passes, nt)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [last - first for first, last in ranges]
    assert all(s == sizes[0] for s in sizes[:-1]) and 0 < sizes[-1] <= sizes[0]
