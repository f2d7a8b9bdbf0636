"""Preemption, wall-clock budget, non-finite steps and corrupt checkpoints."""
import os
import signal

import pytest
import torch

from sparse_llm.config import validate
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.train import checkpoint
from sparse_llm.train.run import build_trainer
from sparse_llm.train.trainer import Callback, TrainingDiverged
from tests.e2e.test_train import SMALL, read_metrics, run_train
from tests.helpers import compose_config


def build(tmp_path, corpus, *extra, name="run"):
    cfg = compose_config(SMALL + ["data=shards", f"data.path={corpus.parent}", f"output_dir={tmp_path}",
                                  f"run_name={name}", "eval_batches=0", *extra])
    validate(cfg)
    return build_trainer(cfg, init_distributed("cpu"))


class AtStep(Callback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            self.action(trainer)


class PoisonGrads(Callback):
    def __init__(self, steps):
        self.steps = steps

    def on_micro_batch_end(self, trainer, output):
        if trainer.step + 1 in self.steps:
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


@pytest.fixture(autouse=True)
def _process_group():
    yield
    shutdown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_exits_cleanly(tmp_path, tiny_corpus, signum):
    trainer = build(tmp_path, tiny_corpus, "max_steps=50", "checkpoint.interval=100",
                    "checkpoint.signal_check_interval=1")
    trainer.callbacks.append(AtStep(4, lambda t: os.kill(os.getpid(), signum)))
    trainer.fit()
    assert trainer.step == 4 and trainer.stopped_by == signal.Signals(signum).name
    assert [p.name for p in checkpoint.list_complete(trainer.run_dir)] == ["step_00000004"]
    assert signal.getsignal(signum) is not trainer  # handlers restored


def test_max_minutes_stops_with_a_checkpoint(tmp_path, tiny_corpus):
    trainer = build(tmp_path, tiny_corpus, "max_steps=10000", "max_minutes=0.0001",
                    "checkpoint.signal_check_interval=1")
    trainer.fit()
    assert trainer.stopped_by == "max_minutes" and trainer.step < 10000
    assert checkpoint.list_complete(trainer.run_dir)[-1].name == f"step_{trainer.step:08d}"


def test_nonfinite_skip_drops_only_the_bad_steps(tmp_path, tiny_corpus):
    trainer = build(tmp_path, tiny_corpus, "max_steps=5", "optim.nonfinite=skip", "logging.interval=5")
    trainer.callbacks.append(PoisonGrads({2, 3}))
    metrics = trainer.fit()
    assert metrics["optim/skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert torch.isfinite(torch.tensor(metrics["loss/ce"]))


def test_nonfinite_skip_gives_up_after_too_many(tmp_path, tiny_corpus):
    trainer = build(tmp_path, tiny_corpus, "max_steps=20", "optim.nonfinite=skip", "optim.max_skipped_steps=2")
    trainer.callbacks.append(PoisonGrads(set(range(1, 21))))
    with pytest.raises(TrainingDiverged, match="consecutive non-finite"):
        trainer.fit()


def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus):
    trainer = build(tmp_path, tiny_corpus, "max_steps=20", "checkpoint.interval=4", "logging.interval=5")
    trainer.callbacks.append(PoisonGrads({5}))
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient at step 5"):
        trainer.fit()
    assert [p.name for p in checkpoint.list_complete(trainer.run_dir)][-1] == "step_00000004"


def test_corrupt_and_incomplete_checkpoints_are_skipped(tmp_path, tiny_corpus, caplog):
    common = ["checkpoint.interval=2", "checkpoint.keep_latest=3", "schedule=constant", "logging.interval=1",
              "eval_batches=0"]
    assert run_train(tmp_path, tiny_corpus, *common, "max_steps=6", name="c")[0] == 0
    newest = checkpoint.list_complete(tmp_path / "c")[-1]
    for data_file in newest.glob("*.distcp"):
        data_file.write_bytes(b"garbage")
    incomplete = checkpoint.step_dir(tmp_path / "c", 8)
    incomplete.mkdir()
    code, run_dir = run_train(tmp_path, tiny_corpus, *common, "max_steps=8", name="c")
    assert code == 0
    assert "skipping unreadable checkpoint" in caplog.text and "step_00000006" in caplog.text
    assert "skipping incomplete checkpoint" in caplog.text
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps[6:] == [5, 6, 7, 8]  # resumed from step 4


def test_resume_with_another_model_names_the_keys(tmp_path, tiny_corpus, capsys):
    assert run_train(tmp_path, tiny_corpus, "max_steps=2", name="m")[0] == 0
    code, _ = run_train(tmp_path, tiny_corpus, "max_steps=4", "model.n_layers=3", name="m")
    assert code == 2
    assert "model.n_layers: checkpoint 2 vs now 3" in capsys.readouterr().err


def test_the_logits_are_freed_before_the_backward(tmp_path, tiny_corpus, monkeypatch):
    # the loss keeps what its backward needs (d loss / d logits); the [tokens, vocab] logits
    # themselves must not stay alive through the backward, where training memory peaks
    import weakref

    import sparse_llm.train.trainer as trainer_module

    alive_at_backward = []
    real_loss = trainer_module.lm_loss

    def spy(output, *args):
        parts = real_loss(output, *args)
        logits = weakref.ref(output.logits)
        parts.total.register_hook(lambda grad: alive_at_backward.append(logits() is not None))
        return parts

    monkeypatch.setattr(trainer_module, "lm_loss", spy)
    trainer = build(tmp_path, tiny_corpus, "max_steps=2")
    try:
        trainer.fit()
    finally:
        trainer.logger.close()
        shutdown()
    assert alive_at_backward and not any(alive_at_backward)


def test_callbacks_after_an_eval_step_see_sharded_parameters(tmp_path, tiny_corpus):
    # the last block and the root stay unsharded after a forward; after evaluate() (forwards only)
    # a callback editing weights in place (dead-unit re-init) would change copies the next backward
    # drops, so evaluate() reshards
    from torch.distributed.tensor import DTensor

    seen = {}
    trainer = build(tmp_path, tiny_corpus, "max_steps=2", "eval_interval=1", "eval_batches=1")
    trainer.callbacks.append(AtStep(1, lambda t: seen.update(
        weight=t.model.blocks[-1].ffn.gate.weight, embed=t.model.embed.weight)))
    try:
        trainer.fit()
    finally:
        shutdown()
    assert isinstance(seen["weight"], DTensor) and isinstance(seen["embed"], DTensor)


@pytest.mark.parametrize("reshard_after_forward", ["true", "false"])
def test_deferred_gradient_sync_reduces_once_a_step_and_matches(tmp_path, tiny_corpus, reshard_after_forward):
    from torch.distributed.tensor import DTensor

    # on a world of one, grad_sync=auto reduces the accumulated gradients after a step's last
    # micro-batch only: the sharded .grad stays unset before it, and the step is the one that
    # reducing after every micro-batch gives
    class GradSeen(Callback):
        def __init__(self):
            self.seen = []

        def on_micro_batch_end(self, trainer, output):
            # reduced gradients live on the sharded (DTensor) parameters; with the parameters kept
            # unsharded between micro-batches the module shows its unsharded tensors instead
            self.seen.append(any(isinstance(p, DTensor) and p.grad is not None for p in trainer.model.parameters()))

    params, seen = {}, {}
    for mode in ("every", "auto"):
        trainer = build(tmp_path, tiny_corpus, "max_steps=2", "tokens_per_step=2048", "logging.interval=1",
                        f"parallel.grad_sync={mode}", f"parallel.reshard_after_forward={reshard_after_forward}",
                        name=f"sync_{mode}_{reshard_after_forward}")
        spy = GradSeen()
        trainer.callbacks.append(spy)
        try:
            trainer.fit()
            params[mode] = [p.full_tensor().clone() for p in trainer.model.parameters()]
        finally:
            trainer.logger.close()
            shutdown()
        seen[mode] = spy.seen
    assert seen["every"] == [True] * 8  # 4 micro-batches a step
    assert seen["auto"] == [False, False, False, True] * 2
    for every, auto in zip(params["every"], params["auto"]):
        torch.testing.assert_close(auto, every, rtol=1e-5, atol=1e-6)
