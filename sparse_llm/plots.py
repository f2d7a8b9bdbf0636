"""Trajectory plots of a run from its RUN_DIR/metrics.jsonl, without wandb.

    python -m sparse_llm.plots RUN_DIR [--out DIR]

writes PNGs into RUN_DIR/plots/ (or DIR): loss.png (loss/ce and val/ce), active_frac.png (active
fraction per layer, log scale), active_heatmap.png (layer x step), dead_frac.png, l1.png (L1 term,
coefficient and L1 per token), and, when the run logged them, throughput.png and energy.png.
Needs matplotlib: pip install -e ".[plots]".
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

INSTALL_HINT = 'matplotlib is needed for plots: pip install -e ".[plots]"  (or: pip install matplotlib)'
_LAYER_KEY = re.compile(r"^sparsity/layer_(\d+)/(.+)$")


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl merged per step, in step order. A resumed run logs some
    steps again: the later record of a step wins, key by key."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the run directory of a training run (RUN_DIR)")
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if "step" not in record:
            continue
        by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a finite number under `key`."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def layer_count(records: list[dict[str, Any]]) -> int:
    layers = {int(m.group(1)) for record in records for key in record if (m := _LAYER_KEY.match(key))}
    return max(layers) + 1 if layers else 0


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """Draw every plot the run's metrics allow; returns the PNG paths written."""
    run_dir = Path(run_dir)
    records = load_metrics(run_dir)
    plt = pyplot()
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def figure(name: str, panels: list[tuple[str, list[tuple[str, str]], bool]]) -> None:
        """One PNG with one panel per (title, [(key, label)], log_y); skipped when no key has data."""
        panels = [(title, [(k, label) for k, label in lines if series(records, k)[0]], log_y)
                  for title, lines, log_y in panels]
        panels = [p for p in panels if p[1]]
        if not panels:
            return
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False, sharex=True)
        for ax, (title, lines, log_y) in zip(axes[:, 0], panels):
            for key, label in lines:
                steps, values = series(records, key)
                ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
            if log_y and all(v > 0 for k, _ in lines for v in series(records, k)[1]):
                ax.set_yscale("log")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("loss", [("cross entropy", [("loss/ce", "train ce"), ("val/ce", "val ce")], False),
                    ("total loss", [("loss/total", "ce + l1 term")], False)])
    layers = layer_count(records)
    layer_lines = [(f"sparsity/layer_{i}/active_frac", f"layer {i}") for i in range(layers)]
    figure("active_frac", [("active fraction per layer", layer_lines + [("sparsity/active_frac/mean", "mean")], True),
                           ("active units per token", [("sparsity/active_per_token/mean", "mean over layers"),
                                                       ("sparsity/active_max_any_layer", "max (any layer)"),
                                                       ("sparsity/worst_tile", "worst 256-tile")], True)])
    figure("dead_frac", [("dead fraction (fired on no token in the log interval)",
                          [("sparsity/dead_frac/mean", "mean"), ("sparsity/dead_frac/max", "max layer"),
                           ("sparsity/dead_frac/min", "min layer")], False),
                         ("re-initialized units", [("sparsity/reinit_units", "per log interval")], False)])
    figure("l1", [("L1 term", [("loss/l1_term", "l1 term")], False),
                  ("L1 coefficient", [("loss/l1_coef", "coefficient")], False),
                  ("L1 per token", [("sparsity/l1_per_token/mean", "mean over layers")], True)])
    figure("throughput", [("tokens/s per GPU", [("perf/tokens_per_sec_per_gpu", "tokens/s/GPU")], False),
                          ("MFU (dense-equivalent)", [("perf/mfu_dense_equiv", "MFU")], False),
                          ("step time (s)", [("perf/step_time_s", "step time")], False)])
    figure("energy", [("energy per token (J)", [("energy/joules_per_token", "train"),
                                                ("energy/eval_joules_per_token", "eval")], False),
                      ("mean power per GPU (W)", [("energy/avg_power_w", "train"),
                                                  ("energy/eval_avg_power_w", "eval")], False)])
    if layers:
        _heatmap(plt, records, layers, out_dir / "active_heatmap.png", written)
    return written


def _heatmap(plt, records, layers: int, path: Path, written: list[Path]) -> None:
    rows = [(r["step"], [r.get(f"sparsity/layer_{i}/active_frac") for i in range(layers)]) for r in records]
    rows = [(s, v) for s, v in rows if all(isinstance(x, (int, float)) and x > 0 for x in v)]
    if not rows:
        return
    from matplotlib.colors import LogNorm

    steps = [s for s, _ in rows]
    grid = [[v[i] for _, v in rows] for i in range(layers)]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.25 * layers))
    left, right = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
    extent = (left, right, layers - 0.5, -0.5)
    image = ax.imshow(grid, aspect="auto", norm=LogNorm(), extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="active fraction")
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title("active fraction per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_llm.plots", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if not paths:
        print(f"no plottable metrics in {args.run_dir / 'metrics.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
