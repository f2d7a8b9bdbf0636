"""The scaling study (DESIGN.md section 8): a grid of scales x L1 coefficients, dense vs sparse,
collected into the paper's tables (CSV and Markdown) and plots.

    python -m sparse_llm.study quality --models tiny small --l1 0 1e-3 3e-3 [--out DIR] [override ...]
    python -m sparse_llm.study efficiency --models 0p5b 1b 1p5b 2b [--out DIR] [override ...]   (GPU)
    python -m sparse_llm.study efficiency --from-json bench_models.json   (tables of a saved run)

`quality` trains every (model, coefficient) point with train.py, plus the dense SwiGLU baseline of
each model, each in its own run directory under DIR/runs (re-running resumes or skips finished
points), and reports final validation CE, sparsity (active units per token, active fraction, dead
fraction), throughput, energy and memory. `efficiency` times the paper's shapes with
sparse_llm.study.bench_model (dense vs the sparse kernels, synthetic sparsity) and reports the
sparse/dense ratios. Each writes DIR/<name>.csv, DIR/<name>.md and DIR/<name>.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sparse_llm.plots import load_metrics

REPO = Path(__file__).resolve().parents[2]
QUALITY_COLUMNS = [
    ("model", "model"), ("variant", "variant"), ("l1", "L1"), ("val_ce", "val CE"), ("train_ce", "train CE"),
    ("active_per_token", "active/token"), ("active_frac", "active frac"), ("dead_frac", "dead frac"),
    ("tokens_per_s", "tokens/s/GPU"), ("mj_per_token", "mJ/token"), ("peak_gib", "peak GiB"),
]
EFFICIENCY_COLUMNS = [
    ("model", "model"), ("active_per_token", "active/token"),
    ("forward_dense", "forward tok/s dense"), ("forward_sparse", "sparse"), ("forward_gain", "forward gain"),
    ("train_dense", "train tok/s dense"), ("train_sparse", "sparse"), ("train_gain", "train gain"),
    ("energy_ratio", "forward energy sparse/dense"), ("memory_ratio", "train memory sparse/dense"),
]


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged value of every metric of a run (earlier values where the last step lacks one)."""
    merged: dict[str, Any] = {}
    for record in load_metrics(run_dir):
        merged.update({k: v for k, v in record.items() if v is not None})
    return merged


def quality_row(model: str, variant: str, l1: float, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "variant": variant, "l1": l1, "val_ce": metrics.get("val/ce"),
        "train_ce": metrics.get("loss/ce"), "active_per_token": metrics.get("sparsity/active_per_token/mean"),
        "active_frac": metrics.get("sparsity/active_frac/mean"), "dead_frac": metrics.get("sparsity/dead_frac/mean"),
        "tokens_per_s": metrics.get("perf/tokens_per_sec_per_gpu"),
        "mj_per_token": 1e3 * metrics["energy/joules_per_token"] if "energy/joules_per_token" in metrics else None,
        "peak_gib": metrics.get("mem/max_allocated_gib"),
    }


def run_quality(models: list[str], coefficients: list[float], out: Path, overrides: list[str]) -> list[dict]:
    rows = []
    for model in models:
        points = [("dense", 0.0)] + [("sparse", c) for c in coefficients]
        for variant, coefficient in points:
            name = f"{model}-dense" if variant == "dense" else f"{model}-l1_{coefficient:g}"
            group = ["sparsity=dense"] if variant == "dense" else ["sparsity=l1", f"sparsity.l1={coefficient}"]
            cmd = [sys.executable, str(REPO / "train.py"), f"model={model}", *group, f"run_name={name}",
                   f"output_dir={out / 'runs'}", *overrides]
            print("study:", " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, cwd=REPO).returncode != 0:
                raise SystemExit(f"study: the run {name} failed; see {out / 'runs' / name} and its output above")
            rows.append(quality_row(model, variant, coefficient, final_metrics(out / "runs" / name)))
    return rows


def run_efficiency(models: list[str], out: Path, overrides: list[str]) -> list[dict]:
    raw = out / "bench_models.json"
    cmd = [sys.executable, "-m", "sparse_llm.study.bench_model", "--models", *models,
           "--variants", "dense", "sparse_kernel", "--json", str(raw), *overrides]
    if subprocess.run(cmd, cwd=REPO).returncode != 0 or not raw.is_file():
        raise SystemExit("study: the efficiency benchmark failed; see its output above")
    return efficiency_rows(json.loads(raw.read_text()))


def efficiency_rows(bench: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dense/sparse pairs of sparse_llm.study.bench_model results, as the paper's Table 1 ratios."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in bench):
        dense = next((r for r in bench if r["model"] == model and r["variant"] == "dense"), None)
        sparse = next((r for r in bench if r["model"] == model and r["variant"] == "sparse_kernel"), None)
        if dense is None or sparse is None:
            continue
        ratio = lambda key: sparse[key] / dense[key] if sparse.get(key) and dense.get(key) else None  # noqa: E731
        rows.append({
            "model": model, "active_per_token": sparse.get("active_per_token"),
            "forward_dense": dense["forward_tokens_per_s"], "forward_sparse": sparse["forward_tokens_per_s"],
            "forward_gain": ratio("forward_tokens_per_s") - 1,
            "train_dense": dense["train_tokens_per_s"], "train_sparse": sparse["train_tokens_per_s"],
            "train_gain": ratio("train_tokens_per_s") - 1,
            "energy_ratio": ratio("forward_mj_per_token"), "memory_ratio": ratio("train_peak_gib"),
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], columns: list[tuple[str, str]], out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key, _ in columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def plot_quality(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation CE against active fraction per model (the sparsity / quality trade-off)."""
    from sparse_llm.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        sparse = [r for r in rows if r["model"] == model and r["variant"] == "sparse" and r["val_ce"] is not None]
        if sparse:
            ax.plot([r["active_frac"] for r in sparse], [r["val_ce"] for r in sparse], "o-", label=f"{model} sparse")
            for r in sparse:
                ax.annotate(f"L1 {r['l1']:g}", (r["active_frac"], r["val_ce"]), fontsize=7)
        dense = [r for r in rows if r["model"] == model and r["variant"] == "dense" and r["val_ce"] is not None]
        if dense:
            ax.axhline(dense[0]["val_ce"], linestyle="--", linewidth=1, label=f"{model} dense")
    ax.set_xscale("log")
    ax.set_xlabel("FFN active fraction")
    ax.set_ylabel("validation CE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    """Sparse/dense gains per scale: forward and training throughput, energy and memory ratios."""
    from sparse_llm.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [("forward_gain", "forward speed-up"), ("train_gain", "training speed-up"),
            ("energy_ratio", "energy ratio"), ("memory_ratio", "memory ratio")]
    width = 0.8 / len(keys)
    for index, (key, label) in enumerate(keys):
        values = [row[key] if row[key] is not None else 0.0 for row in rows]
        ax.bar([i + index * width for i in range(len(rows))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [row["model"] for row in rows])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_llm.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("half", choices=["quality", "efficiency"])
    parser.add_argument("--models", nargs="+", help="model configs (not needed with --from-json)")
    parser.add_argument("--l1", nargs="+", type=float, default=[2e-5, 1e-4, 1e-3], help="quality: coefficients")
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--from-json", type=Path, help="efficiency: tables from a saved bench_model --json file")
    args, overrides = parser.parse_known_args(argv)
    if not args.models and not (args.half == "efficiency" and args.from_json):
        parser.error(f"{args.half} needs --models (e.g. --models tiny small)")
    if args.half == "quality":
        rows = run_quality(args.models, args.l1, args.out, overrides)
        written = write_tables(rows, QUALITY_COLUMNS, args.out, "quality")
        plot, plotter = args.out / "quality.png", plot_quality
    else:
        rows = (efficiency_rows(json.loads(args.from_json.read_text())) if args.from_json
                else run_efficiency(args.models, args.out, overrides))
        written = write_tables(rows, EFFICIENCY_COLUMNS, args.out, "efficiency")
        plot, plotter = args.out / "efficiency.png", plot_efficiency
    try:
        plotter(rows, plot)
        written.append(plot)
    except ImportError as error:
        print(f"study: no plot ({error})", file=sys.stderr)
    print((args.out / f"{args.half}.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main(sys.argv[1:])
