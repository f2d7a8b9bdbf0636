"""launch/slurm.sbatch without a cluster: fake `srun` and `scontrol` on PATH, a SLURM environment,
torchrun with 2 CPU processes. Checks the rendezvous wiring, the stop file on the time-limit
warning, the clean save and the requeue."""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.dist.launcher import free_port
from tests.e2e.test_train import SMALL
from tests.helpers import REPO

FAKE_SRUN = """#!/usr/bin/env bash
# drop srun's own options, run the command once (one node)
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; exit 0; fi
echo "$@" >> "$FAKE_SLURM_LOG"
"""


def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2", RDZV_PORT=str(free_port()),
               LOG_DIR=str(tmp_path / "logs"), FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"), OMP_NUM_THREADS="1")
    return env


def sbatch(tmp_path, corpus, env, *extra):
    args = SMALL + ["data=shards", f"data.path={corpus.parent}", f"output_dir={tmp_path}", "run_name=job",
                    "micro_batch_size=4", "tokens_per_step=512", "eval_batches=0", *extra]
    return subprocess.Popen(["bash", str(REPO / "launch/slurm.sbatch"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sbatch_trains_on_two_ranks(tmp_path, tiny_corpus):
    env = fake_slurm(tmp_path)
    proc = sbatch(tmp_path, tiny_corpus, env, "max_steps=3")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert (tmp_path / "job/checkpoints/step_00000003/COMPLETE").is_file()
    assert not (tmp_path / "scontrol.log").exists()  # finished: no requeue
    rank_logs = list((tmp_path / "logs/4242").rglob("stdout.log")) + list((tmp_path / "logs/4242").rglob("stderr.log"))
    assert rank_logs, "torchrun --log-dir wrote no per-rank logs"


@pytest.mark.slow
def test_time_limit_warning_saves_and_requeues(tmp_path, tiny_corpus):
    env = fake_slurm(tmp_path)
    proc = sbatch(tmp_path, tiny_corpus, env, "max_steps=100000", "checkpoint.signal_check_interval=1",
                  "checkpoint.interval=100000", "logging.interval=1")
    metrics = tmp_path / "job/metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no training steps within 120 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            subprocess.run(["pkill", "-f", f"output_dir={tmp_path}"])
            proc.kill()
    assert proc.returncode == 0, out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = sorted((tmp_path / "job/checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    assert int(saved[0].name.split("_")[1]) == steps[-1] < 100000
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "logs/stop-4242").exists()
