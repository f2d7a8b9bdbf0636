"""FSDP2 on gloo with 2 processes against one process: same losses, and DCP checkpoints that
reshard between world sizes."""
import json

import pytest

from tests.dist.launcher import run_world
from tests.e2e.test_train import SMALL

COMMON = SMALL + ["sparsity.l1=0.05", "logging.interval=1", "schedule=constant", "eval_batches=0", "tokens_per_step=1024",
                  "micro_batch_size=4", "checkpoint.interval=3"]


def losses(run_dir, key="loss/total"):
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def args_for(tmp_path, corpus, name, *extra):
    return COMMON + ["data=shards", f"data.path={corpus.parent}", f"output_dir={tmp_path}", f"run_name={name}", *extra]


@pytest.mark.slow
def test_two_ranks_match_one_and_reshard(tmp_path, tiny_corpus):
    import train

    assert train.main(args_for(tmp_path, tiny_corpus, "one", "max_steps=6")) == 0
    assert run_world(2, args_for(tmp_path, tiny_corpus, "two", "max_steps=6")) == [0, 0]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    l1_one, l1_two = losses(tmp_path / "one", "loss/l1_term"), losses(tmp_path / "two", "loss/l1_term")
    assert l1_one[1] > 1e-3  # the penalty matters in these losses
    for step in one:
        assert l1_two[step] == pytest.approx(l1_one[step], rel=1e-4), step

    # world 2 -> 1: the one-process run continues the two-rank run from its step-6 checkpoint
    assert train.main(args_for(tmp_path, tiny_corpus, "two", "max_steps=9")) == 0
    # world 1 -> 2: the two-rank run continues the one-process run
    assert run_world(2, args_for(tmp_path, tiny_corpus, "one", "max_steps=9")) == [0, 0]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (7, 8, 9):
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


@pytest.mark.slow
def test_hsdp_on_four_ranks_matches_one(tmp_path, tiny_corpus):
    import train

    extra = ["max_steps=3", "micro_batch_size=2", "tokens_per_step=512"]
    assert train.main(args_for(tmp_path, tiny_corpus, "one", *extra)) == 0
    assert run_world(4, args_for(tmp_path, tiny_corpus, "hsdp", "parallel=hsdp", *extra)) == [0] * 4
    one, hsdp = losses(tmp_path / "one"), losses(tmp_path / "hsdp")
    for step in one:
        assert hsdp[step] == pytest.approx(one[step], rel=1e-4), step


@pytest.mark.slow
def test_gradient_sync_once_a_step_matches_every_micro_batch(tmp_path, tiny_corpus):
    # parallel.grad_sync=last: the micro-batches before a step's last accumulate unsharded gradients
    # and reduce once (2 ranks x 2 micro-batches here), with the parameters kept unsharded between
    # them when reshard_after_forward=false; the losses must follow gradient sync every micro-batch
    import train

    assert train.main(args_for(tmp_path, tiny_corpus, "every", "max_steps=4", "parallel.grad_sync=every")) == 0
    for name, extra in (("last", []), ("last_unsharded", ["parallel.reshard_after_forward=false"])):
        assert run_world(2, args_for(tmp_path, tiny_corpus, name, "max_steps=4", "parallel.grad_sync=last",
                                     *extra)) == [0, 0]
        every, last = losses(tmp_path / "every"), losses(tmp_path / name)
        assert sorted(last) == [1, 2, 3, 4]
        for step in every:
            assert last[step] == pytest.approx(every[step], rel=1e-4), (name, step)
