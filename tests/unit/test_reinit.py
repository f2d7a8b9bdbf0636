"""Dead-neuron re-initialization: only dead rows of the gate (up for `relu`) change, with the paper's
scaling, decided at the end of a token window from counts accumulated over micro-batches; exact resume."""
import json
from types import SimpleNamespace

import pytest
import torch

from sparse_llm.config import ModelConfig
from sparse_llm.model import FFNStats, Transformer
from sparse_llm.sparsity.reinit import DeadNeuronReinit, _generator_seed, reinit_rows_

D_FF = 16


def test_reinit_rows_hand_computed():
    weight = torch.arange(24, dtype=torch.float32).view(6, 4)
    before = weight.clone()
    dead = torch.tensor([False, True, False, False, True, False])
    reinit_rows_(weight, dead, torch.Generator().manual_seed(7))
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    expected = before.clone()
    expected[dead] = 0.9 * before[dead] + 0.1 * 0.02 * noise[dead]
    assert torch.equal(weight[~dead], before[~dead])
    torch.testing.assert_close(weight, expected)
    assert not torch.equal(weight[dead], before[dead])


def tiny_model(ffn: str) -> Transformer:
    cfg = ModelConfig(d_model=8, n_layers=2, n_heads=2, d_ff=D_FF, vocab_size=32, seq_len=8)
    torch.manual_seed(0)
    model = Transformer(cfg, ffn)
    model.init_weights()
    return model


def output_with_fires(*per_layer_units: list[int]) -> SimpleNamespace:
    """A model output whose layer i fired (once) on exactly the units per_layer_units[i]."""
    stats = []
    for units in per_layer_units:
        counts = torch.zeros(D_FF, dtype=torch.int32)
        counts[units] = 1
        stats.append(FFNStats(torch.tensor(0.0), torch.zeros(1, 1, dtype=torch.int32), counts))
    return SimpleNamespace(ffn_stats=stats)


def trainer_for(model, tokens_per_step=100):
    return SimpleNamespace(model=model, device=torch.device("cpu"), cfg=SimpleNamespace(tokens_per_step=tokens_per_step))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("ffn,target", [("relu_gated", "gate"), ("relu", "up")])
def test_only_dead_rows_of_the_gate_change_at_window_end(ffn, target):
    model = tiny_model(ffn)
    callback = DeadNeuronReinit(n_layers=2, d_ff=D_FF, window_tokens=250, seed=3)
    trainer = trainer_for(model)
    callback.on_fit_start(trainer)
    before = snapshot(model)
    alive0, alive1 = list(range(0, 12)), [0]
    # step 1: two micro-batches; unit 12 of layer 0 fires in the second only -> alive
    callback.on_micro_batch_end(trainer, output_with_fires(alive0[:6], alive1))
    callback.on_micro_batch_end(trainer, output_with_fires(alive0[6:] + [12], []))
    metrics = {}
    callback.on_step_end(trainer, 1, metrics)
    assert metrics == {"sparsity/reinit_units": 0.0, "sparsity/reinit_units_total": 0.0}
    callback.on_micro_batch_end(trainer, output_with_fires([], []))
    callback.on_step_end(trainer, 2, None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # window (250 tokens) still open
    callback.on_micro_batch_end(trainer, output_with_fires([], []))
    metrics = {}
    callback.on_step_end(trainer, 3, metrics)  # 300 tokens: the window closes
    dead0, dead1 = [13, 14, 15], list(range(1, D_FF))
    assert metrics == {"sparsity/reinit_units": float(len(dead0) + len(dead1)),
                       "sparsity/reinit_units_total": float(len(dead0) + len(dead1))}
    after = snapshot(model)
    for name in before:
        changed_rows = (after[name] != before[name]).any(dim=-1).nonzero().flatten().tolist() \
            if after[name].ndim == 2 else ([0] if not torch.equal(after[name], before[name]) else [])
        if name == f"blocks.0.ffn.{target}.weight":
            assert changed_rows == dead0, name
        elif name == f"blocks.1.ffn.{target}.weight":
            assert changed_rows == dead1, name
        else:
            assert changed_rows == [], name
    # the paper's update, with the callback's per-(step, layer) noise
    for layer, dead in ((0, dead0), (1, dead1)):
        name = f"blocks.{layer}.ffn.{target}.weight"
        noise = torch.randn(before[name].shape, generator=torch.Generator().manual_seed(_generator_seed(3, 3, layer)))
        torch.testing.assert_close(after[name][dead], 0.9 * before[name][dead] + 0.1 * 0.02 * noise[dead])
    # the next window starts from zero counts
    assert callback.tokens_in_window == 0 and int(callback.fires.sum()) == 0
    metrics = {}
    callback.on_step_end(trainer, 4, metrics)
    assert metrics["sparsity/reinit_units"] == 0.0 and metrics["sparsity/reinit_units_total"] == 18.0


def test_window_without_statistics_is_skipped():
    model = tiny_model("relu_gated")
    callback = DeadNeuronReinit(n_layers=2, d_ff=D_FF, window_tokens=100)
    trainer = trainer_for(model)
    callback.on_fit_start(trainer)
    before = snapshot(model)
    callback.on_micro_batch_end(trainer, SimpleNamespace(ffn_stats=[None, None]))
    metrics = {}
    callback.on_step_end(trainer, 1, metrics)
    assert metrics["sparsity/reinit_units"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert callback.window_has_stats  # the next window judges again


def test_swiglu_is_refused():
    callback = DeadNeuronReinit(n_layers=2, d_ff=D_FF, window_tokens=100)
    with pytest.raises(ValueError, match="ReLU FFN"):
        callback.on_fit_start(trainer_for(tiny_model("swiglu")))


def test_state_dict_round_trip():
    model = tiny_model("relu_gated")
    callback = DeadNeuronReinit(n_layers=2, d_ff=D_FF, window_tokens=1000)
    trainer = trainer_for(model)
    callback.on_fit_start(trainer)
    callback.on_micro_batch_end(trainer, output_with_fires([1, 2], [3]))
    callback.on_step_end(trainer, 1, None)
    state = callback.state_dict()
    other = DeadNeuronReinit(n_layers=2, d_ff=D_FF, window_tokens=1000)
    other.load_state_dict(state)
    other.on_fit_start(trainer)
    assert torch.equal(other.fires, callback.fires) and other.tokens_in_window == 100
    assert other.fires.dtype == torch.int64


# ---- through the trainer --------------------------------------------------------------------------
def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_reinit_resumes_exactly(tmp_path, tiny_corpus):
    from tests.e2e.test_train import run_train

    common = ["logging.interval=1", "checkpoint.interval=5", "schedule=constant", "eval_batches=0",
              "sparsity.l1=0.05", "optim.lr=3e-3", "sparsity.reinit_dead=true", "sparsity.reinit_window_tokens=1536"]
    assert run_train(tmp_path, tiny_corpus, *common, "max_steps=12", name="straight")[0] == 0
    assert run_train(tmp_path, tiny_corpus, *common, "max_steps=7", name="resumed")[0] == 0
    code, resumed_dir = run_train(tmp_path, tiny_corpus, *common, "max_steps=12", name="resumed")
    assert code == 0
    straight = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    resumed = {r["step"]: r for r in read_metrics(resumed_dir)}  # steps 6.. logged again: the later wins
    # 512-token steps close a 1536-token window every 3 steps; the checkpoint at step 5 is mid-window
    assert all(straight[s]["sparsity/reinit_units"] == 0 for s in range(1, 13) if s % 3)
    # (a window that restarted at the resume would close at steps 8 and 11 instead, and re-initialize elsewhere)
    assert straight[12]["sparsity/reinit_units"] > 0
    for step in range(1, 13):
        assert resumed[step]["loss/total"] == straight[step]["loss/total"], step
        assert resumed[step]["sparsity/reinit_units_total"] == straight[step]["sparsity/reinit_units_total"], step
