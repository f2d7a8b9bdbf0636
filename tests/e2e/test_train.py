"""The trainer end to end on a tiny model and a corpus the test writes: loss falls, sparsity moves
with the L1 penalty, resume is exact, bad inputs fail cleanly without touching the run directory."""
import json

import pytest

import train
from tests.helpers import REPO

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=256", "model.vocab_size=320",
         "model.seq_len=64", "micro_batch_size=8", "tokens_per_step=512", "logging.wandb.mode=disabled",
         "eval_interval=20", "eval_batches=2", "schedule.warmup_steps=5", "device=cpu"]


def run_train(tmp_path, corpus, *extra, name="run"):
    args = SMALL + ["data=shards", f"data.path={corpus.parent}", f"output_dir={tmp_path}", f"run_name={name}", *extra]
    code = train.main(args)
    return code, tmp_path / name


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_l1_drives_sparsity(tmp_path, tiny_corpus):
    common = ["max_steps=60", "logging.interval=10", "optim.lr=3e-3"]
    code, sparse_dir = run_train(tmp_path, tiny_corpus, *common, "sparsity.l1=0.05", name="sparse")
    assert code == 0
    code, free_dir = run_train(tmp_path, tiny_corpus, *common, "sparsity.l1=0", name="free")
    assert code == 0
    sparse, free = read_metrics(sparse_dir), read_metrics(free_dir)
    assert sparse[-1]["loss/ce"] < sparse[0]["loss/ce"] - 1.0
    assert free[-1]["loss/ce"] < free[0]["loss/ce"] - 1.0
    assert "val/ce" in sparse[-1] and sparse[-1]["val/ppl"] > 1
    sparse_active = sparse[-1]["sparsity/active_frac/mean"]
    free_active = free[-1]["sparsity/active_frac/mean"]
    assert sparse_active < 0.5 * free_active, (sparse_active, free_active)
    assert sparse_active < sparse[0]["sparsity/active_frac/mean"]
    assert free[-1]["loss/l1_term"] == 0 and sparse[-1]["loss/l1_term"] > 0
    assert {"sparsity/layer_1/active_p99", "sparsity/worst_tile", "perf/tokens_per_sec_per_gpu"} <= set(sparse[-1])
    assert (sparse_dir / "config.yaml").is_file() and (sparse_dir / "launches.jsonl").is_file()


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_corpus):
    # evaluation at the checkpoint steps: its forward leaves the last block (not resharded after
    # forward, and no backward follows) unsharded when the checkpoint is written
    common = ["logging.interval=1", "checkpoint.interval=5", "schedule=constant", "eval_batches=1",
              "eval_interval=5"]
    assert run_train(tmp_path, tiny_corpus, *common, "max_steps=12", name="straight")[0] == 0
    assert run_train(tmp_path, tiny_corpus, *common, "max_steps=7", name="resumed")[0] == 0
    code, resumed_dir = run_train(tmp_path, tiny_corpus, *common, "max_steps=12", name="resumed")
    assert code == 0
    straight = {r["step"]: r["loss/total"] for r in read_metrics(tmp_path / "straight")}
    resumed = {r["step"]: r["loss/total"] for r in read_metrics(resumed_dir)}
    # the second launch restarts from the step-5 checkpoint and logs steps 6.. again
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == straight[step], step


def test_finished_run_is_not_overwritten(tmp_path, tiny_corpus):
    common = ["max_steps=5", "checkpoint.interval=5", "eval_batches=0"]
    code, run_dir = run_train(tmp_path, tiny_corpus, *common, name="done")
    assert code == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    code, _ = run_train(tmp_path, tiny_corpus, *common, "checkpoint.resume=false", name="done")
    assert code == 2
    code, _ = run_train(tmp_path, tiny_corpus, *common, "model.d_model=32", name="done")
    assert code == 2
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("overrides,message", [
    (["model.d_model=30"], "model.d_model=30 is not divisible by model.n_heads"),
    (["model.nonsense=1"], "nonsense"),
    (["model=huge"], "model/huge"),
    (["sparsity.l1=-0.1"], "sparsity.l1"),
    (["model.vocab_size=100"], "model.vocab_size"),
])
def test_bad_config_is_one_clear_line(tmp_path, tiny_corpus, capsys, overrides, message):
    import torch.distributed as dist

    code, run_dir = run_train(tmp_path, tiny_corpus, "max_steps=1", *overrides)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
    assert not dist.is_initialized()  # the process group was taken down (NCCL warns at exit otherwise)


def test_missing_shards_dir_is_a_clear_error(tmp_path, capsys):
    code = train.main(SMALL + ["data=shards", f"data.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path}",
                               "run_name=bad"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written for a run that could not start


def test_train_script_is_at_the_repo_root():
    assert (REPO / "train.py").is_file()


@pytest.mark.parametrize("kernel", ["auto", "hybrid", "twell"])
def test_every_kernel_mode_trains_on_cpu_through_the_reference(tmp_path, tiny_corpus, kernel):
    code, run_dir = run_train(tmp_path, tiny_corpus, f"kernel={kernel}", "max_steps=4", "logging.interval=2",
                              name=kernel)
    assert code == 0
    last = read_metrics(run_dir)[-1]
    assert last["loss/ce"] > 0
    if kernel == "auto":
        assert last["kernel/layers_on_kernel"] == 0  # a fresh ReLU layer is ~50% active: dense is faster
