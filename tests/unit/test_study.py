"""The study runner on CPU: a tiny quality grid end to end, and the efficiency tables from benchmark rows."""
import csv

import pytest

from sparse_llm.study.__main__ import EFFICIENCY_COLUMNS, efficiency_rows, main, write_tables
from tests.e2e.test_train import SMALL


@pytest.mark.slow
def test_quality_grid_writes_tables_and_plot(tmp_path, tiny_corpus, capsys):
    overrides = [o for o in SMALL if not o.startswith("device")] + [
        "device=cpu", "data=shards", f"data.path={tiny_corpus.parent}", "max_steps=6", "logging.interval=3",
        "eval_interval=6"]
    main(["quality", "--models", "tiny", "--l1", "0.01", "0.1", "--out", str(tmp_path), *overrides])
    rows = list(csv.DictReader(open(tmp_path / "quality.csv")))
    assert [(r["variant"], r["l1"]) for r in rows] == [("dense", "0.0"), ("sparse", "0.01"), ("sparse", "0.1")]
    assert all(float(r["val_ce"]) > 0 for r in rows)
    assert rows[0]["active_frac"] == "" and float(rows[2]["active_frac"]) < 1
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert "| tiny | sparse | 0.1 |" in (tmp_path / "quality.md").read_text()


def test_efficiency_rows_are_sparse_over_dense(tmp_path):
    bench = [
        {"model": "1b", "variant": "dense", "train_tokens_per_s": 100.0, "train_peak_gib": 40.0,
         "forward_tokens_per_s": 200.0, "forward_mj_per_token": 4.0},
        {"model": "1b", "variant": "sparse_kernel", "train_tokens_per_s": 120.0, "train_peak_gib": 30.0,
         "forward_tokens_per_s": 260.0, "forward_mj_per_token": 3.0, "active_per_token": 25.0},
    ]
    (row,) = efficiency_rows(bench)
    assert row["train_gain"] == pytest.approx(0.2) and row["forward_gain"] == pytest.approx(0.3)
    assert row["energy_ratio"] == pytest.approx(0.75) and row["memory_ratio"] == pytest.approx(0.75)
    csv_path, md_path = write_tables([row], EFFICIENCY_COLUMNS, tmp_path, "efficiency")
    assert "| 1b | 25 | 200 | 260 | 0.3 |" in md_path.read_text()


def test_efficiency_tables_from_a_saved_benchmark_need_no_models(tmp_path, capsys):
    import json

    saved = tmp_path / "bench_models.json"
    saved.write_text(json.dumps([
        {"model": "0p5b", "variant": "dense", "train_tokens_per_s": 100.0, "train_peak_gib": 20.0,
         "forward_tokens_per_s": 300.0, "forward_mj_per_token": 2.0},
        {"model": "0p5b", "variant": "sparse_kernel", "train_tokens_per_s": 113.0, "train_peak_gib": 16.0,
         "forward_tokens_per_s": 330.0, "forward_mj_per_token": 1.5, "active_per_token": 29.0}]))
    main(["efficiency", "--from-json", str(saved), "--out", str(tmp_path / "tables")])
    assert "| 0p5b | 29 |" in (tmp_path / "tables" / "efficiency.md").read_text()
    with pytest.raises(SystemExit):
        main(["quality", "--out", str(tmp_path)])
    assert "quality needs --models" in capsys.readouterr().err
