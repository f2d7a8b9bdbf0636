import pytest
import torch

from sparse_llm.config import ModelConfig
from sparse_llm.kernels.reference import activation_stats, ffn_hidden
from sparse_llm.model import FeedForward, Transformer, count_params, flops_per_token
from tests.helpers import compose_config

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=97, seq_len=16)


@pytest.mark.parametrize("kind", ["swiglu", "relu_gated", "relu"])
def test_forward_shapes_and_stats(kind):
    model = Transformer(TINY, kind)
    model.init_weights()
    out = model(torch.randint(0, 97, (3, 16)))
    assert out.logits.shape == (3, 16, 97)
    assert len(out.ffn_stats) == 2
    if kind == "swiglu":
        assert all(s is None for s in out.ffn_stats)
    else:
        stats = out.ffn_stats[0]
        assert stats.tile_counts.shape == (48, 1) and stats.neuron_counts.shape == (64,)
        assert stats.l1_sum.requires_grad


def test_param_count_matches_instantiated_model():
    for kind in ("swiglu", "relu_gated", "relu"):
        model = Transformer(TINY, kind)
        assert count_params(TINY, kind) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,paper_billions", [("0p5b", 0.51), ("1b", 1.03), ("1p5b", 1.54), ("2b", 2.05)])
def test_paper_scales_match_the_paper_within_one_percent(name, paper_billions):
    cfg = compose_config([f"model={name}"]).model
    assert abs(count_params(cfg) / 1e9 - paper_billions) / paper_billions < 0.01
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


def test_flops_per_token_is_six_n_plus_attention():
    cfg = compose_config(["model=1b"]).model
    matmul_params = count_params(cfg) - 2 * cfg.d_model * cfg.n_layers - cfg.d_model
    expected = 6 * matmul_params + 3 * cfg.n_layers * 2 * cfg.seq_len * cfg.d_model
    assert flops_per_token(cfg) == expected
    assert flops_per_token(cfg, training=False) == expected / 3


def test_causality():
    model = Transformer(TINY)
    model.init_weights()
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_meta_build_then_init_is_deterministic():
    def build():
        with torch.device("meta"):
            model = Transformer(TINY)
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        return model
    a, b = build(), build()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(a.rope_cos, Transformer(TINY).rope_cos)


def test_checkpoint_keeps_the_stock_weight_layout():
    state = Transformer(TINY).state_dict()
    assert state["blocks.0.ffn.down.weight"].shape == (TINY.d_model, TINY.d_ff)
    assert state["blocks.0.ffn.gate.weight"].shape == (TINY.d_ff, TINY.d_model)


@pytest.mark.parametrize("gated", [True, False])
def test_gradcheck_ffn_with_l1_term(gated):
    torch.manual_seed(0)
    d, d_ff, n = 6, 10, 5
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(d_ff, d, dtype=torch.float64, requires_grad=True) if gated else None
    wu = torch.randn(d_ff, d, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(d, d_ff, dtype=torch.float64, requires_grad=True)

    def objective(x, wu, wd, *maybe_wg):
        h = ffn_hidden(x, maybe_wg[0] if maybe_wg else None, wu)
        l1_sum = activation_stats(h)[0].to(torch.float64)
        return (h @ wd.T).square().sum() + 0.3 * l1_sum

    inputs = (x, wu, wd) + ((wg,) if gated else ())
    assert torch.autograd.gradcheck(objective, inputs)


def test_ffn_module_matches_reference():
    ffn = FeedForward(8, 16, "relu_gated")
    x = torch.randn(2, 3, 8)
    y, stats = ffn(x)
    h = torch.relu(x @ ffn.gate.weight.T) * (x @ ffn.up.weight.T)
    torch.testing.assert_close(y, h @ ffn.down.weight.T)
    assert stats.tile_counts.sum() == (h != 0).sum()


def test_blocks_get_float32_rope_tables_under_bf16_mixed_precision(tmp_path):
    # FSDP2 casts a module's floating-point forward inputs unless told not to: the RoPE tables
    # would arrive in bf16 (coarse angles, and the fused kernel would not run)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sparse_llm.config import ParallelConfig
    from sparse_llm.parallel.fsdp import apply_parallelism

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, vocab_size=50, seq_len=16))
        apply_parallelism(model, ParallelConfig(), init_device_mesh("cpu", (1,)), "bf16", torch.device("cpu"))
        seen = {}
        model.blocks[1].attn.register_forward_pre_hook(
            lambda module, args: seen.update(x=args[0].dtype, cos=args[1].dtype, sin=args[2].dtype))
        model(torch.randint(0, 50, (2, 16)))
        assert seen == {"x": torch.bfloat16, "cos": torch.float32, "sin": torch.float32}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False])
def test_the_last_block_is_not_resharded_after_the_forward(tmp_path, reshard):
    # its backward comes first: resharding it would only make the backward wait for an all-gather
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from sparse_llm.config import ParallelConfig
    from sparse_llm.parallel.fsdp import apply_parallelism

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = Transformer(ModelConfig(d_model=64, n_layers=3, n_heads=2, d_ff=128, vocab_size=50, seq_len=16))
        apply_parallelism(model, ParallelConfig(reshard_after_forward=reshard), init_device_mesh("cpu", (1,)),
                          "fp32", torch.device("cpu"))
        model(torch.randint(0, 50, (2, 16))).logits.sum().backward()  # a full step first: lazy init
        model(torch.randint(0, 50, (2, 16)))
        sharded = [isinstance(block.attn_norm.weight, DTensor) for block in model.blocks]
        assert sharded == ([True, True, False] if reshard else [False, False, False])
    finally:
        dist.destroy_process_group()
