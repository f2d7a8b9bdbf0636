"""The multi-GPU check runner (sparse_llm.study.multi_gpu) end to end on CPU: two gloo processes
stand in for two GPUs. Every check must pass: loss parity of 1 vs 2 processes on the same global
batch, SIGKILL of the whole torchrun tree and auto-resume, a stop file and a resume onto one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_llm.study import multi_gpu
from tests.helpers import REPO


def test_runner_passes_on_two_cpu_processes(tmp_path, tiny_corpus):
    out = tmp_path / "multi.json"
    code = multi_gpu.main(["--gpus", "2", "--device", "cpu", "--model", "tiny", "--steps", "18",
                           "--sparse-kernel", "torch", "--data", str(tiny_corpus.parent),
                           "--root", str(tmp_path / "runs"), "--json", str(out)])
    results = json.loads(out.read_text())
    assert code == 0, {k: v for k, v in results.items() if isinstance(v, dict) and not v.get("passed")}
    assert results["parity_sparse"]["layers_compared"] == 4  # the tiny model's layers
    assert results["parity_sparse"]["overflow_rows_ratio"] == 1.0  # summed over both ranks
    kill = results["kill_and_resume"]
    assert kill["resumed_from_step"] == 10 < kill["killed_after_step"]
    # fp32 on CPU: the resume is exact
    assert kill["loss_rel_diff_vs_uninterrupted"]["max"] < 1e-6
    onto_one = results["resume_onto_one_gpu"]
    assert onto_one["resumed_from_step"] == onto_one["stopped_at_step"] < 18
    assert onto_one["loss_rel_diff_vs_uninterrupted"]["max"] < 1e-5


def test_runner_refuses_a_folder_with_earlier_runs(tmp_path, capsys):
    (tmp_path / "dense-1gpu").mkdir()
    with pytest.raises(SystemExit) as stop:
        multi_gpu.main(["--device", "cpu", "--model", "tiny", "--root", str(tmp_path)])
    assert stop.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_kill_tree_kills_processes_in_their_own_sessions():
    # torchrun starts its workers in new sessions: killing its process group would leave them running
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, cwd=REPO)
    deadline = time.monotonic() + 20
    children = []
    while not children and time.monotonic() < deadline:
        children = [int(p) for p in (os.popen(f"pgrep -P {parent.pid}").read().split())]
        time.sleep(0.1)
    assert children, "the child process did not start"
    multi_gpu.kill_tree(parent.pid)
    parent.wait(timeout=10)
    assert parent.returncode == -signal.SIGKILL
    time.sleep(0.5)
    for child in children:
        try:
            os.kill(child, 0)
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state == "Z", f"child {child} survived"
        except ProcessLookupError:
            pass


def test_loss_diff_and_metrics_reading(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss/ce": 4.0}, {"step": 2, "loss/ce": 3.0}, {"step": 2, "loss/ce": 3.3}]  # step 2 after a resume
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metrics = multi_gpu.read_metrics(run)
    assert metrics[2]["loss/ce"] == 3.3 and multi_gpu.last_step(run) == 2
    other = {1: {"loss/ce": 4.0}, 2: {"loss/ce": 3.0}}
    diff = multi_gpu.loss_diff(other, metrics, [1, 2])
    assert abs(diff["max"] - 0.1) < 1e-9 and abs(diff["mean"] - 0.05) < 1e-9
    assert not multi_gpu.curves_agree(diff)
    assert multi_gpu.curves_agree({"mean": 1e-3, "max": 2e-2})
    (tmp_path / "run.log").write_text("x resumed from /a/step_00000010 (step 10)\ny resumed from /a/step_00000016 (step 16)\n")
    assert multi_gpu.resumed_step(tmp_path / "run.log") == 16
