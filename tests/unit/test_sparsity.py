import math

import pytest
import torch

from sparse_llm.config import ModelConfig, ScheduleConfig
from sparse_llm.kernels.reference import activation_stats
from sparse_llm.model import FFNStats, Transformer
from sparse_llm.sparsity import SparsityStats, l1_coefficient
from sparse_llm.train.loss import lm_loss
from sparse_llm.train.schedule import lr_at


def stats_of(h: torch.Tensor) -> FFNStats:
    return FFNStats(*activation_stats(h))


def test_activation_stats_hand_computed():
    h = torch.zeros(3, 300)
    h[0, [0, 1, 299]] = torch.tensor([1.0, -2.0, 3.0])
    h[2, 5] = 0.5
    l1, tiles, neurons = activation_stats(h)
    assert l1.item() == 6.5
    assert tiles.tolist() == [[2, 1], [0, 0], [1, 0]]
    assert neurons[[0, 1, 5, 299]].tolist() == [1, 1, 1, 1] and neurons.sum() == 4


def test_sparsity_summary_hand_computed():
    stats = SparsityStats(n_layers=2, d_ff=300, device=torch.device("cpu"))
    h0 = torch.zeros(4, 300)
    h0[0, :10] = 1.0     # 10 active, all in tile 0
    h0[1, 250:262] = 2.0  # 12 active: 6 in tile 0, 6 in tile 1
    h1 = torch.zeros(4, 300)
    h1[:, 7] = -1.0       # every token: 1 active
    stats.update([stats_of(h0), stats_of(h1)])
    out = stats.summarize()
    assert out["sparsity/layer_0/active_per_token"] == pytest.approx(22 / 4)
    assert out["sparsity/layer_0/active_frac"] == pytest.approx(22 / 4 / 300)
    assert out["sparsity/layer_0/l1_per_token"] == pytest.approx((10 + 24) / 4)
    assert out["sparsity/layer_0/dead_frac"] == pytest.approx(1 - 22 / 300)
    assert out["sparsity/layer_0/active_max"] == 12 and out["sparsity/layer_0/worst_tile"] == 10
    assert out["sparsity/layer_0/active_p50"] == 0
    assert out["sparsity/layer_1/active_per_token"] == 1 and out["sparsity/layer_1/dead_frac"] == pytest.approx(299 / 300)
    assert out["sparsity/active_per_token/min"] == 1 and out["sparsity/active_per_token/max"] == pytest.approx(5.5)
    assert stats.summarize() == {}  # reset after a summary


def test_l1_coefficient_warmup():
    assert l1_coefficient(1e-3, 0, 0) == 1e-3
    assert l1_coefficient(1e-3, 5, 10) == pytest.approx(5e-4)
    assert l1_coefficient(1e-3, 50, 10) == 1e-3


def test_lr_schedules():
    cosine = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, 100, cosine) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, cosine) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, cosine) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 100, cosine) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    wsd = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(79, 1.0, 100, wsd) == 1.0 and lr_at(90, 1.0, 100, wsd) == pytest.approx(0.5)
    assert lr_at(50, 1.0, 100, ScheduleConfig(name="constant", warmup_steps=0)) == 1.0


def _grads_after(model, batches, coef, normalizer):
    model.zero_grad()
    for tokens in batches:
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:], coef, normalizer).total.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_loss_is_invariant_to_gradient_accumulation():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=50, seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    model.init_weights()
    tokens = torch.randint(0, 50, (8, 17))
    global_tokens = 8 * 16
    one = _grads_after(model, [tokens], 0.05, global_tokens)
    four = _grads_after(model, tokens.chunk(4), 0.05, global_tokens)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b)


def test_l1_term_definition():
    """coeff x mean over layers of (sum |h| / tokens), and CE as the token mean."""
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, vocab_size=50, seq_len=16)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, 50, (2, 17))
    out = model(tokens[:, :-1])
    parts = lm_loss(out, tokens[:, 1:], 0.1, 32)
    mean_l1 = sum(s.l1_sum for s in out.ffn_stats) / 3 / 32
    torch.testing.assert_close(parts.l1_term, (0.1 * mean_l1).detach())
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(parts.total, ce + 0.1 * mean_l1)


def test_overflow_rows_count_tokens_past_the_packed_formats():
    from sparse_llm.kernels.hybrid import DEFAULT_ELL_WIDTH
    from sparse_llm.kernels.twell_reference import DEFAULT_SLOTS

    stats = SparsityStats(n_layers=1, d_ff=1024, device=torch.device("cpu"))
    h = torch.zeros(5, 1024)
    h[0, : DEFAULT_ELL_WIDTH + 1] = 1.0    # past the ELL width, spread over tiles: 129 actives, tile 0 full
    h[1, :DEFAULT_ELL_WIDTH] = 1.0         # exactly at the width: not an overflow
    h[2, 300:300 + DEFAULT_SLOTS + 1] = 1.0  # one tile one past TwELL's slots
    out = {}
    stats.update([stats_of(h)])
    out = stats.summarize()
    assert out["kernel/overflow_rows"] == 1
    assert out["kernel/twell_overflow_rows"] == 3  # rows 0 and 1 fill tile 0 past 32 slots too, row 2 tile 1
