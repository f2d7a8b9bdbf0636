import torch

from sparse_llm.config import ModelConfig
from sparse_llm.model import Transformer
from sparse_llm.study.bench_model import calibrate_gate_sparsity


def test_calibration_gives_the_requested_active_units_per_layer():
    cfg = ModelConfig(d_model=128, n_layers=3, n_heads=4, d_ff=2048, vocab_size=100, seq_len=64)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    tokens = torch.randint(0, 100, (4, 64))
    measured = calibrate_gate_sparsity(model, tokens, mean_active=20)
    assert all(abs(m - 20) < 4 for m in measured), measured
    out = model(tokens)
    for stats in out.ffn_stats:
        active = stats.tile_counts.sum(1).float().mean().item()
        assert 12 < active < 28, active
