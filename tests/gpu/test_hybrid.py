"""GPU tests of the hybrid training kernels: forward, statistics and every gradient against the
float32 reference and against the pure-PyTorch hybrid reference run on the same inputs, on synthetic
and adversarial sparsity, bf16 and fp16, odd token counts, the non-gated variant, opcheck,
activation checkpointing and CUDA-graph capture. Fresh random inputs every call; outputs land in
memory poisoned with NaN first."""
import pytest
import torch

from tests.gpu.helpers import poison_cache, rel

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from sparse_llm.kernels import hybrid_reference as ref
    from sparse_llm.kernels import reference
    from sparse_llm.kernels.hybrid import hybrid_ffn, kernel_supported


def make_inputs(n, d, f, dtype, gated=True, mean_active=8.0, adversarial=False, dense_unit=False):
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**62)
    rn = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = rn(n, d) * torch.exp(0.15 * rn(n, 1))
    x[:, 0] = 1.0
    wg = rn(f, d) / d**0.5
    wu = rn(f, d) / d**0.5
    wd = rn(d, f) / f**0.5
    wg[:, 0] = 0.0
    pre = x[:2048] @ wg.t()
    wg[:, 0] = -torch.quantile(pre.flatten()[: 2**24], 1.0 - mean_active / f)
    if adversarial:
        x[0] = 0.0  # empty row
        x[1, 1:] = 0.0
        x[1, 1] = 1.0
        wg[:, 1] = wg[:, 0].abs() + 1.0 + torch.rand(f, generator=gen, device="cuda")  # row 1 fully dense
        x[2:, 1] = 0.0
        x[2 : min(n, 40), 1] = torch.rand(min(n, 40) - 2, generator=gen, device="cuda")  # rows past W
        wg[5] = 0.0  # dead units
        wg[f - 1] = 0.0
    if dense_unit:
        wg[7] = 0.0
        wg[7, 0] = 3.0  # unit 7 fires on every token (x[:, 0] = 1)
    if not gated:
        wu, wg = wg, None
    c = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    dy = rn(n, d).to(dtype)
    return c(x), c(wg), c(wu), c(wd), dy


def run_ours(x, wg, wu, wd, dy, c, width):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd) if t is not None]
    args = leaves if wg is not None else [leaves[0], None, *leaves[1:]]
    poison_cache()
    y, l1, tc, nc = hybrid_ffn(*args, ell_width=width)
    grads = torch.autograd.grad([y, l1], leaves, [dy, torch.tensor(c, device="cuda")])
    return y.detach(), l1.detach(), tc, nc, grads


def run_fp32_reference(x, wg, wu, wd, dy, c):
    """The float32 truth, with ReLU's pattern (which pairs are active) taken from the op's own gate
    GEMM in x's dtype, as bf16 autograd differentiates its own gate: where the float32 pre-activation
    and the rounded one disagree on the sign of a g at rounding level, dg = dh * u jumps whole while
    everything else moves by ~g, and a few such pairs put dx and dW_gate past the tolerance (about one
    run in six of this file, 2026-11-24)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, wg, wu, wd) if t is not None]
    args = leaves if wg is not None else [leaves[0], None, *leaves[1:]]
    gate = wg if wg is not None else wu
    active = ref.gate_preact(x, gate) > 0
    g = torch.nn.functional.linear(args[0], args[1] if wg is not None else args[2])
    # value ReLU(g) on the pattern, derivative the pattern
    a = torch.where(active, g + (g.clamp_min(0) - g).detach(), 0)
    h = a * torch.nn.functional.linear(args[0], args[2]) if wg is not None else a
    y = torch.nn.functional.linear(h, args[3])
    l1, tc, nc = reference.activation_stats(h)
    grads = torch.autograd.grad([y, l1], leaves, [dy.float(), torch.tensor(c, device="cuda")])
    return y.detach(), l1.detach(), tc, nc, grads


def check_case(x, wg, wu, wd, dy, width, c=0.05, tol=1e-2):
    assert kernel_supported(x, wg, wu, wd)
    y, l1, tc, nc, g = run_ours(x, wg, wu, wd, dy, c, width)
    for t in (y, *g):
        assert torch.isfinite(t).all(), "unwritten or non-finite output"
    yr, l1r, tcr, ncr, gr = run_fp32_reference(x, wg, wu, wd, dy, c)
    errs = {"y": rel(y, yr), "l1": rel(l1, l1r)}
    names = ["dx", "dwg", "dwu", "dwd"] if wg is not None else ["dx", "dwu", "dwd"]
    errs.update({k: rel(a, b) for k, a, b in zip(names, g, gr)})
    assert max(errs.values()) < tol, errs
    # statistics: identical to the bf16 reference's (same cuBLAS gate, same pattern), allowing
    # the rare pair where the float32 reference's gate sign differs from the rounded one
    n, f = x.shape[0], wu.shape[0]
    assert tc.shape == (n, -(-f // 256)) and nc.shape == (f,)
    assert (tc - tcr).abs().sum().item() <= max(2, 1e-3 * tcr.sum().item())
    # against the pure-PyTorch hybrid reference on the same inputs (same format, same math)
    out = ref.forward(x, wg, wu, wd, width)
    # active means h != 0: a pair whose u sums to exactly 0.0 in the kernel's order but not in
    # cuBLAS's (or back) counts on one side only; seen about once in 10^7 active pairs
    allowed = max(2, int(5e-7 * out[2].sum().item()))
    assert (tc - out[2]).abs().sum().item() <= allowed and (nc - out[3]).abs().sum().item() <= allowed
    fwd = torch.ops.sparse_llm.hybrid_ffn_fwd(x, wg, wu, wd, width)
    assert torch.equal(fwd[4], out[4]), "row bitmask differs"
    assert torch.equal(fwd[5], out[5]), "tile prefix differs"
    assert torch.equal(fwd[6][..., 0], out[6][..., 0]), "ELL gate values differ"
    assert rel(fwd[6][..., 1], out[6][..., 1]) < 1e-5, "ELL up values differ"
    assert rel(fwd[0], out[0]) < 5e-3
    dl1 = torch.tensor(c, device="cuda")
    bk = torch.ops.sparse_llm.hybrid_ffn_bwd(dy, dl1, x, wg, wu, wd, *fwd[4:7], fwd[3], *fwd[7:])
    bref = ref.backward(dy, dl1, x, wg, wu, wd, fwd[4], fwd[5], fwd[6])
    for k, a, b in zip(["dx", "dwg", "dwu", "dwd"], bk, bref):
        if b is not None:
            # both in x's dtype, each within tol of the float32 truth: compare at the same tolerance
            assert rel(a, b) < tol, (k, rel(a, b))
    return errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean_active,width", [(4, 64), (12, 8), (40, 1), (20, 128)])
def test_synthetic_levels(dtype, mean_active, width):
    check_case(*make_inputs(777, 256, 1024, dtype, mean_active=mean_active), width=width)


@pytest.mark.parametrize("n", [1, 33, 1000])
def test_odd_token_counts(n):
    check_case(*make_inputs(n, 256, 512, torch.bfloat16, mean_active=10), width=16)


@pytest.mark.parametrize("width", [2, 64])
@pytest.mark.parametrize("fused_gate", [True, False])
def test_adversarial(width, fused_gate, monkeypatch):
    # the format from the TwELL gate kernel's epilogue (hy_from_twell, on Hopper) and from cuBLAS's G
    # (hy_pack): a dense row (every tile past the TwELL slots), an empty row, rows past the ELL width
    from sparse_llm.kernels import hybrid

    monkeypatch.setattr(hybrid, "FUSED_GATE", fused_gate)
    inputs = make_inputs(300, 256, 1024, torch.bfloat16, mean_active=6, adversarial=True)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert hybrid.fused_gate_supported(inputs[0], inputs[1]) == (fused_gate and hopper)
    check_case(*inputs, width=width)


def test_dense_unit_many_tokens():
    # one unit active on every token: its column list exceeds the kernel's 1024-token list capacity
    # and the 4096-token scan round
    check_case(*make_inputs(5000, 256, 512, torch.bfloat16, mean_active=6, dense_unit=True), width=32)


@pytest.mark.parametrize("d", [2304, 3072, 3584, 4096])
def test_wide_d_model(d):
    # past d_model 2048: hy_dwy's slices of 1 or 2 chunks where d_model / 256 is odd or not a multiple
    # of 4 (9, 12, 14, 16 chunks: 9, 3, 7, 4 stored parts a pair), hy_dx with ptxas's own register
    # choice, hy_forward with the row of x in shared memory (from 2816); rows past the ELL and a dense row
    check_case(*make_inputs(600, d, 1024, torch.bfloat16, mean_active=12, adversarial=True), width=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_gated(dtype):
    check_case(*make_inputs(500, 256, 768, dtype, gated=False, mean_active=10, adversarial=True), width=8)


def test_model_width():
    check_case(*make_inputs(513, 2048, 1024, torch.bfloat16, mean_active=10, adversarial=True), width=16)


def test_opcheck_cuda():
    x, wg, wu, wd, dy = make_inputs(64, 256, 512, torch.bfloat16, mean_active=10)
    args = [x.requires_grad_(), wg.requires_grad_(), wu.requires_grad_(), wd.requires_grad_(), 8]
    torch.library.opcheck(torch.ops.sparse_llm.hybrid_ffn_fwd.default, args)
    out = torch.ops.sparse_llm.hybrid_ffn_fwd(x.detach(), wg.detach(), wu.detach(), wd.detach(), 8)
    bargs = [dy, torch.tensor(0.1, device="cuda"), x.detach(), wg.detach(), wu.detach(), wd.detach(),
             out[4], out[5], out[6], out[3], out[7], out[8]]
    torch.library.opcheck(torch.ops.sparse_llm.hybrid_ffn_bwd.default, bargs)


def test_checkpoint():
    x, wg, wu, wd, dy = make_inputs(200, 256, 512, torch.bfloat16, mean_active=10)
    x = x.requires_grad_()

    def block(x):
        y, l1, _, _ = hybrid_ffn(x, wg, wu, wd, ell_width=8)
        return (y.float() * dy.float()).sum() + 0.1 * l1

    (g1,) = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), x)
    (g2,) = torch.autograd.grad(block(x), x)
    assert rel(g1, g2) < 1e-3


def test_cuda_graph_capture():
    x, wg, wu, wd, dy = make_inputs(256, 256, 512, torch.bfloat16, mean_active=10)
    leaves = [t.requires_grad_() for t in (x, wg, wu, wd)]
    dl1 = torch.tensor(0.1, device="cuda")

    def step():
        y, l1, _, _ = hybrid_ffn(*leaves, ell_width=8)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert rel(a, b) < 1e-3


@pytest.mark.parametrize("split", [16, 1 << 30])
def test_dw_split_units(split, monkeypatch):
    # the dW passes with units split over many items (float32 partial rows added, then written by
    # hy_dw_finish), and with every unit in one item
    from sparse_llm.kernels import hybrid

    monkeypatch.setattr(hybrid, "DW_SPLIT_TOKENS", split)
    check_case(*make_inputs(700, 256, 512, torch.bfloat16, mean_active=10, adversarial=True), width=4)
    check_case(*make_inputs(300, 256, 512, torch.bfloat16, gated=False, mean_active=10), width=4)
    check_case(*make_inputs(3000, 256, 512, torch.bfloat16, mean_active=6, dense_unit=True), width=8)
    check_case(*make_inputs(2000, 2048, 1024, torch.bfloat16, mean_active=12, dense_unit=True), width=8)


def test_dw_units_past_32767(monkeypatch):
    # hy_dw_plan packs unit << 16 | part into its item order: units past 32767 (d_ff up to 65504),
    # some split over several items
    from sparse_llm.kernels import hybrid

    monkeypatch.setattr(hybrid, "DW_SPLIT_TOKENS", 32)
    x, wg, wu, wd, dy = make_inputs(300, 256, 33024, torch.bfloat16, mean_active=60, dense_unit=True)
    wg[33000] = 0.0
    wg[33000, 0] = 3.0  # unit 33000 fires on every token (x[:, 0] = 1): ten items
    check_case(x, wg, wu, wd, dy, width=8)


@pytest.mark.parametrize("n,mean_active", [(1000, 10), (40000, 4)])
def test_dw_token_walk(n, mean_active):
    # the dW passes walk a unit's column bitmask 128 words at a time into a 64-token list: 40000 tokens
    # take several rounds of words (~310 tokens a unit: lists filled and flushed mid-word)
    check_case(*make_inputs(n, 256, 512, torch.bfloat16, mean_active=mean_active, adversarial=True), width=4)


@pytest.mark.parametrize("rows,units", [(1 << 20, 0), (3, 16), (256, 128), (64, 1 << 30)])
def test_split_rows(rows, units, monkeypatch):
    # hy_forward and hy_dx with long rows split over ROW_PARTS warps: every row (empty ones too),
    # only the 3 longest, the default, none
    from sparse_llm.kernels import hybrid

    monkeypatch.setattr(hybrid, "SPLIT_ROWS", rows)
    monkeypatch.setattr(hybrid, "SPLIT_ROW_UNITS", units)
    check_case(*make_inputs(1000, 256, 1024, torch.bfloat16, mean_active=16, adversarial=True), width=8)
    check_case(*make_inputs(333, 512, 1024, torch.float16, gated=False, mean_active=20), width=16)
    check_case(*make_inputs(2000, 2048, 2048, torch.bfloat16, mean_active=24), width=32)


@pytest.mark.parametrize("width_d", [1, 40, 4096])
def test_backward_ell_width(width_d, monkeypatch):
    # the backward stores the pairs of ranks < WD (hy_dwy's parts of dy.Wd_j; (a, u) from hy_fill_au past
    # the saved ELL) and recomputes the rest in every pass: WD as wide as the saved ELL, wider, and
    # past every row (nothing recomputed)
    from sparse_llm.kernels import hybrid

    monkeypatch.setattr(hybrid, "BACKWARD_ELL_WIDTH", width_d)
    check_case(*make_inputs(700, 256, 1024, torch.bfloat16, mean_active=30, adversarial=True), width=8)
    check_case(*make_inputs(300, 256, 512, torch.float16, gated=False, mean_active=60), width=4)
    check_case(*make_inputs(500, 2048, 1024, torch.bfloat16, mean_active=40, adversarial=True), width=8)


def test_balance_inputs_only_change_the_balance():
    # the forward's neuron counts size the dW passes' work items and its row plan orders and splits the rows
    # of hy_dx: zero or inflated counts, any permutation and any split count give the same gradients
    x, wg, wu, wd, dy = make_inputs(900, 256, 512, torch.bfloat16, mean_active=12, dense_unit=True)
    fwd = torch.ops.sparse_llm.hybrid_ffn_fwd(x, wg, wu, wd, 8)
    dl1 = torch.tensor(0.05, device="cuda")
    counts, order, split = fwd[3], fwd[7], fwd[8]
    identity = torch.arange(900, dtype=torch.int32, device="cuda")
    balances = [(counts, order, split), (torch.zeros_like(counts), order, split), (counts * 7 + 100, order, split),
                (counts, identity, torch.zeros_like(split)), (counts, identity.flip(0), split + 10_000)]
    grads = [torch.ops.sparse_llm.hybrid_ffn_bwd(dy, dl1, x, wg, wu, wd, fwd[4], fwd[5], fwd[6], *balance)
             for balance in balances]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert rel(a, b) < 1e-3


@pytest.mark.parametrize("d,f,n,mean_active", [(768, 2112, 16384, 600), (768, 2112, 16384, 1100),
                                               (2048, 5632, 4096, 2600)])
def test_training_regime(d, f, n, mean_active):
    # the first steps of a sparse run from a fresh ReLU layer: a third to half of the units active,
    # most pairs far past the ELL width, and (125m: d_ff 2112) a partial last 256-unit tile
    from sparse_llm.kernels.hybrid import resolve_ell_width

    width = resolve_ell_width(None, f)
    x, wg, wu, wd, dy = make_inputs(n, d, f, torch.bfloat16, mean_active=mean_active)
    check_case(x, wg, wu, wd, dy, width=width)
    # the forward has no atomics on y: repeated calls on fresh (poisoned) memory are bit-identical
    outputs = []
    for _ in range(3):
        poison_cache()
        y, l1, tc, nc = hybrid_ffn(x, wg, wu, wd, ell_width=width)
        outputs.append((y, tc, nc))
    for y, tc, nc in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(tc, outputs[0][1]) and torch.equal(nc, outputs[0][2])
