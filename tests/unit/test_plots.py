"""`python -m sparse_llm.plots RUN_DIR`: trajectories from metrics.jsonl, without wandb; and a real
tiny training run whose JSONL carries the telemetry and is plotted."""
import json
import subprocess
import sys

import pytest

from sparse_llm import plots
from tests.helpers import REPO


def write_jsonl(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "loss/c')


def synthetic_records(energy: bool):
    records = []
    for step in (10, 20, 30):
        r = {"step": step, "loss/ce": 5.0 - step / 10, "loss/total": 5.1 - step / 10, "loss/l1_term": 0.1,
             "loss/l1_coef": 1e-3, "sparsity/active_frac/mean": 0.1 / step, "sparsity/dead_frac/mean": 0.01,
             "sparsity/layer_0/active_frac": 0.2 / step, "sparsity/layer_1/active_frac": 0.05 / step,
             "sparsity/l1_per_token/mean": 2.0, "perf/tokens_per_sec_per_gpu": 1000.0}
        if energy:
            r.update({"energy/joules_per_token": 0.01, "energy/avg_power_w": 600.0})
        records.append(r)
    records.append({"step": 20, "val/ce": 3.5})
    records.append({"step": 20, "loss/ce": 2.9})  # a resumed launch logged step 20 again
    return records


def test_load_metrics_merges_steps_and_skips_a_torn_line(tmp_path):
    write_jsonl(tmp_path, synthetic_records(energy=False) + [{"step": 30, "loss/ce": None}])
    records = plots.load_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[1]["loss/ce"] == 2.9 and records[1]["val/ce"] == 3.5 and records[1]["loss/l1_term"] == 0.1
    assert plots.series(records, "loss/ce") == ([10, 20], [4.0, 2.9])  # None (non-finite) is left out
    assert plots.layer_count(records) == 2


def test_plots_written_for_the_metrics_present(tmp_path):
    pytest.importorskip("matplotlib")
    write_jsonl(tmp_path / "dense", synthetic_records(energy=False))
    names = {p.name for p in plots.plot_run(tmp_path / "dense")}
    assert names == {"loss.png", "active_frac.png", "active_heatmap.png", "dead_frac.png", "l1.png", "throughput.png"}
    assert all((tmp_path / "dense" / "plots" / n).stat().st_size > 1000 for n in names)
    write_jsonl(tmp_path / "gpu", synthetic_records(energy=True))
    assert "energy.png" in {p.name for p in plots.plot_run(tmp_path / "gpu", tmp_path / "elsewhere")}
    assert (tmp_path / "elsewhere" / "energy.png").is_file()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path, synthetic_records(energy=False))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[plots\]"'):
        plots.plot_run(tmp_path)
    assert plots.main([str(tmp_path)]) == 2
    assert 'pip install -e ".[plots]"' in capsys.readouterr().err


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_training_run_telemetry_and_plots(tmp_path, tiny_corpus):
    """A real run on CPU: energy reported unavailable (never zero), re-initialization counted, a profiler
    window written, and `python -m sparse_llm.plots RUN_DIR` draws the JSONL."""
    pytest.importorskip("matplotlib")
    from tests.e2e.test_train import read_metrics, run_train

    code, run_dir = run_train(tmp_path, tiny_corpus, "max_steps=20", "logging.interval=5", "sparsity.l1=0.05",
                              "sparsity.reinit_dead=true", "sparsity.reinit_window_tokens=2048",
                              "telemetry.profile_start_step=2", "telemetry.profile_steps=2",
                              "telemetry.memory_snapshot_step=3")
    assert code == 0
    records = read_metrics(run_dir)
    assert [r.get("energy/available") for r in records if "energy/available" in r] == [0.0]
    assert not any(k.startswith("energy/") and k != "energy/available" for r in records for k in r)
    assert all("sparsity/reinit_units" in r for r in records if "loss/ce" in r)
    assert not any("perf/mfu_dense_equiv" in r for r in records)  # CPU: no peak, no MFU
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["ops_rank0_steps2-3.txt",
                                                                       "trace_rank0_steps2-3.json"]
    assert json.loads((run_dir / "hardware.json").read_text())["device_name"] == "cpu"
    result = subprocess.run([sys.executable, "-m", "sparse_llm.plots", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = {line.rsplit("/", 1)[-1] for line in result.stdout.split()}
    assert {"loss.png", "active_frac.png", "active_heatmap.png", "dead_frac.png", "l1.png"} <= written
    assert "energy.png" not in written
