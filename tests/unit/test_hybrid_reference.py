"""CPU tests of the hybrid training format and op: format round trip, every product against autograd,
opcheck of the custom ops on CPU tensors (whose path is the reference), routing logic, and an nvcc
compile of every hybrid CUDA source for sm_90a and sm_80."""
import shutil

import pytest
import torch

from sparse_llm.kernels import hybrid_reference as ref
from sparse_llm.kernels import reference
from sparse_llm.kernels.hybrid import HybridRouter, hybrid_ffn, resolve_ell_width


def make_case(n, d, f, dtype=torch.float64, gated=True, adversarial=False, seed=0):
    """Random FFN inputs with a sparse gate; `adversarial` adds an empty row, a fully dense row,
    rows past any small ELL width, and dead units."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0
    wg = torch.randn(f, d, generator=gen, dtype=torch.float64) / d**0.5
    wu = torch.randn(f, d, generator=gen, dtype=torch.float64) / d**0.5
    wd = torch.randn(d, f, generator=gen, dtype=torch.float64) / f**0.5
    wg[:, 0] = -1.0  # most pre-activations negative: a sparse gate
    if adversarial:
        x[0] = 0.0  # empty row (g = 0 is inactive)
        x[1] = 0.0
        x[1, 1] = 1.0
        wg[:, 1] = torch.rand(f, generator=gen, dtype=torch.float64) + 2.0  # row 1 fully dense
        x[2:6, 1] = 0.7  # rows 2..5: dense-ish, past a small width
        wg[3] = 0.0  # dead units (g = 0 everywhere)
        wg[f - 1] = 0.0
        x[2:, 1] = torch.where(torch.arange(2, n) < 6, 0.7, 0.0)
    if not gated:
        wu = wg.clone()  # the non-gated variant gates through w_up
        wg = None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(wg), cast(wu), cast(wd)


def grads_of(fn, x, wg, wu, wd, dy, c):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd) if t is not None]
    args = list(leaves) if wg is not None else [leaves[0], None, leaves[1], leaves[2]]
    y, l1 = fn(*args)
    loss = (y.float() * dy.float()).sum() + c * l1
    return y.detach(), l1.detach(), torch.autograd.grad(loss, leaves)


def reference_pair(x, wg, wu, wd):
    h = reference.ffn_hidden(x, wg, wu)
    return reference.ffn_reference(x, wg, wu, wd), reference.activation_stats(h)[0]


# ---------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("f", [1, 31, 32, 96, 300, 512])
def test_bits_round_trip(f):
    active = torch.rand(13, f, generator=torch.Generator().manual_seed(f)) < 0.3
    active[0] = True
    active[1] = False
    bits = ref.pack_bits(active)
    assert bits.dtype == torch.int32 and bits.shape == (13, ref.words(f))
    assert torch.equal(ref.unpack_bits(bits, f), active)


@pytest.mark.parametrize("width", [1, 4, 64])
def test_ell_round_trip_and_ranks(width):
    gen = torch.Generator().manual_seed(width)
    n, f = 17, 600
    g = torch.randn(n, f, generator=gen) - 1.0
    g[3] = 1.0  # a fully dense row
    g[4] = -1.0  # an empty row
    u = torch.randn(n, f, generator=gen)
    mrow, tprefix, ell = ref.pack(g, u, width)
    active, a, uu, keep = ref.unpack(mrow, ell, f)
    assert torch.equal(active, g > 0)
    rank = ref.ranks(active)
    assert torch.equal(keep, active & (rank < width))
    assert torch.equal(a, torch.where(keep, g, 0))
    assert torch.equal(uu, torch.where(keep, u, 0))
    # slots past a row's count are zero, and counts in slots match
    counts = active.sum(1)
    filled = (ell[..., 0] != 0).sum(1)
    assert torch.equal(filled, counts.clamp(max=width))
    # the kernels' rank: tile prefix + popcounts within the tile
    t, j = torch.nonzero(active, as_tuple=True)
    assert torch.equal(ref.rank_from_format(mrow, tprefix, t, j), rank[t, j])
    assert torch.equal(tprefix[:, 0], torch.zeros(n, dtype=torch.int32))


def test_forward_format_matches_pattern():
    x, wg, wu, wd = make_case(40, 64, 320, dtype=torch.float32, adversarial=True)
    y, l1, tc, nc, mrow, tprefix, ell = ref.forward(x, wg, wu, wd, 8)
    g = x @ wg.t()
    assert torch.equal(ref.unpack_bits(mrow, 320), g > 0)
    assert ell.shape == (40, 8, 2)
    h = reference.ffn_hidden(x, wg, wu)
    l1r, tcr, ncr = reference.activation_stats(h)
    assert torch.equal(tc, tcr) and torch.equal(nc, ncr)
    torch.testing.assert_close(l1, l1r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, reference.ffn_reference(x, wg, wu, wd), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- products


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("width", [2, 16, 4096])
@pytest.mark.parametrize("adversarial", [False, True])
def test_op_products_match_autograd(gated, width, adversarial):
    x, wg, wu, wd = make_case(45, 64, 192, gated=gated, adversarial=adversarial, seed=width)
    dy = torch.randn(45, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = 0.37

    def ours(x, wg, wu, wd):
        y, l1, _, _ = hybrid_ffn(x, wg, wu, wd, ell_width=width)
        return y, l1

    y, l1, g_ours = grads_of(ours, x, wg, wu, wd, dy, c)
    yr, l1r, g_ref = grads_of(reference_pair, x, wg, wu, wd, dy, c)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l1r, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b) + 1e-9


def test_stats_match_reference():
    x, wg, wu, wd = make_case(33, 64, 520, dtype=torch.float32, adversarial=True)
    _, _, tc, nc = hybrid_ffn(x, wg, wu, wd, ell_width=4)
    _, tcr, ncr = reference.activation_stats(reference.ffn_hidden(x, wg, wu))
    assert tc.dtype == torch.int32 and nc.dtype == torch.int32
    assert torch.equal(tc, tcr) and torch.equal(nc, ncr)


def test_bf16_within_tolerance_of_fp32():
    x, wg, wu, wd = make_case(64, 128, 256, dtype=torch.bfloat16, seed=3)
    dy = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def ours(x, wg, wu, wd):
        y, l1, _, _ = hybrid_ffn(x, wg, wu, wd, ell_width=8)
        return y, l1

    y, _, g_ours = grads_of(ours, x, wg, wu, wd, dy, 0.1)
    f32 = [t.float() for t in (x, wg, wu, wd)]
    yr, _, g_ref = grads_of(reference_pair, *f32, dy, 0.1)
    assert y.dtype == torch.bfloat16
    assert torch.linalg.norm(y.float() - yr) <= 1e-2 * torch.linalg.norm(yr)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == torch.bfloat16
        assert torch.linalg.norm(a.float() - b) <= 1e-2 * torch.linalg.norm(b)


def test_leading_dims_and_only_l1_used():
    x, wg, wu, wd = make_case(24, 64, 96, dtype=torch.float32, seed=5)
    x3 = x.view(2, 12, 64).requires_grad_()
    y, l1, tc, _ = hybrid_ffn(x3, wg, wu, wd)
    assert y.shape == (2, 12, 64) and tc.shape == (24, 1)
    (gx,) = torch.autograd.grad(l1, x3)  # y unused: its gradient is None inside the backward
    xr = x3.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference.activation_stats(reference.ffn_hidden(xr.view(24, 64), wg, wu))[0], xr)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-5)


def test_only_y_used():
    # the L1 sum unused: its gradient arrives as None (no zero gradients are materialized)
    x, wg, wu, wd = make_case(24, 64, 96, dtype=torch.float32, seed=6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd)]
    y, _, _, _ = hybrid_ffn(*leaves)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd)]
    y_ref = torch.nn.functional.linear(reference.ffn_hidden(*ref_leaves[:3]), ref_leaves[3])
    for a, b in zip(grads, torch.autograd.grad(y_ref.square().sum(), ref_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_l1", [True, False])
def test_gradients_through_aot_autograd(use_l1):
    # torch.compile keeps the op opaque and runs its registered autograd through AOTAutograd
    x, wg, wu, wd = make_case(32, 64, 128, dtype=torch.float32, seed=8)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd)]

    def loss(x, wg, wu, wd):
        y, l1, _, _ = hybrid_ffn(x, wg, wu, wd)
        return y.square().sum() + (0.1 * l1 if use_l1 else 0.0)

    eager = torch.autograd.grad(loss(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_checkpoint_recompute():
    x, wg, wu, wd = make_case(20, 64, 128, dtype=torch.float32, seed=7)
    x = x.requires_grad_()

    def block(x):
        y, l1, _, _ = hybrid_ffn(x, wg, wu, wd, ell_width=3)
        return y.sum() + l1

    (g1,) = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), x)
    (g2,) = torch.autograd.grad(block(x), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("gated", [True, False])
def test_opcheck_cpu(gated):
    x, wg, wu, wd = make_case(19, 64, 96, dtype=torch.float32, gated=gated, adversarial=True)
    args = [x.requires_grad_(), None if wg is None else wg.requires_grad_(), wu.requires_grad_(),
            wd.requires_grad_(), 4]
    torch.library.opcheck(torch.ops.sparse_llm.hybrid_ffn_fwd.default, args)
    out = torch.ops.sparse_llm.hybrid_ffn_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
    dy = torch.randn(19, 64)
    bargs = [dy, torch.tensor(0.3), x.detach(), None if wg is None else wg.detach(), wu.detach(),
             wd.detach(), out[4], out[5], out[6], out[3], out[7], out[8]]
    torch.library.opcheck(torch.ops.sparse_llm.hybrid_ffn_bwd.default, bargs)


def test_resolve_ell_width():
    assert resolve_ell_width(None, 5632) == 128
    assert resolve_ell_width(7, 5632) == 7
    assert resolve_ell_width(1000, 96) == 96
    with pytest.raises(ValueError):
        resolve_ell_width(0, 96)


# ---------------------------------------------------------------------------------------------- routing


def test_router_hysteresis_and_sync():
    r = HybridRouter(2, crossover=0.02, band=0.25, momentum=0.0)
    assert r.use_hybrid == [False, False]
    r.observe(0, torch.tensor(0.01))  # below low (0.015): hybrid on the device ...
    r.observe(1, torch.tensor(0.018))  # inside the band, coming from dense: stays dense
    assert r.use_hybrid == [False, False]  # ... but the host decision moves only at sync
    assert r.sync() == [True, False]
    assert r.kernel_for(0) == "hybrid" and r.kernel_for(1) == "dense"
    r.observe(0, torch.tensor(0.019))  # inside the band, coming from hybrid: stays hybrid
    assert r.sync() == [True, False]
    r.observe(0, torch.tensor(0.021))  # above the crossover (0.02): back to dense
    r.observe(1, torch.tensor(0.001))
    assert r.sync() == [False, True]


def test_router_smoothing_and_state():
    r = HybridRouter(1, crossover=0.02, band=0.0, momentum=0.9)
    for _ in range(5):
        r.observe(0, torch.tensor(0.0))  # ema = 0.9^k: still far above 0.02 after 5 steps
    assert r.sync() == [False]
    for _ in range(40):
        r.observe(0, torch.tensor(0.0))
    assert r.sync() == [True]
    state = r.state_dict()
    r2 = HybridRouter(1, crossover=0.02)
    r2.load_state_dict(state)
    assert r2.use_hybrid == [True] and torch.equal(r2.ema, r.ema)
    with pytest.raises(ValueError):
        HybridRouter(1, band=1.5)


# ---------------------------------------------------------------------------------------------- CUDA sources

HYBRID_SOURCES = ["hybrid.cu"]
# 3072 and 3584: hy_forward with the row of x in shared memory; hy_dwy and hy_dwx at their widest slices
DEFINE_SETS = [{"HY_D": 2048, "HY_GATED": 1, "HY_DTYPE": 0}, {"HY_D": 256, "HY_GATED": 0, "HY_DTYPE": 1},
               {"HY_D": 512, "HY_GATED": 1, "HY_DTYPE": 1}, {"HY_D": 2048, "HY_GATED": 1, "HY_FWD_MINB": 4},
               {"HY_D": 3072, "HY_GATED": 1, "HY_DTYPE": 0}, {"HY_D": 3584, "HY_GATED": 1, "HY_DTYPE": 1}]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check CUDA")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("source", HYBRID_SOURCES)
def test_nvcc_compiles(source, arch):
    import subprocess

    from sparse_llm.kernels.loader import CUDA_DIR

    for defines in DEFINE_SETS:
        cmd = ["nvcc", "-cubin", "-std=c++17", f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Xptxas",
               "-v", f"-I{CUDA_DIR}", "-o", "/dev/null", *[f"-D{k}={v}" for k, v in defines.items()],
               str(CUDA_DIR / source)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"nvcc failed on {source} for {arch} {defines}:\n{result.stderr}"
        report = result.stderr
        assert "error" not in report.lower()
        for line in report.splitlines():
            if "spill" in line and "HY_FWD_MINB" not in defines:  # the capped variant may spill
                assert "0 bytes spill stores" in line, f"{defines}: {line}"
