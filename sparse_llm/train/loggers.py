"""Metric sinks: console, JSONL in the run directory, and wandb (offline unless configured)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from sparse_llm.config import WandbConfig

log = logging.getLogger("sparse_llm")


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def _fmt(value: float) -> str:
    if isinstance(value, float) and (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)):
        return f"{value:.3e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleSink:
    """One line per log step with the headline numbers; the full set goes to JSONL and wandb."""
    HEADLINE = {
        "loss/total": "loss", "loss/ce": "ce", "loss/l1_term": "l1", "val/ce": "val_ce",
        "sparsity/active_frac/mean": "active", "sparsity/dead_frac/mean": "dead",
        "optim/lr": "lr", "optim/grad_norm": "gnorm", "perf/tokens_per_sec_per_gpu": "tok/s",
    }

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def log(self, metrics: dict[str, float], step: int) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{short} {_fmt(metrics[key])}" for key, short in self.HEADLINE.items() if key in metrics]
        log.info(" | ".join(parts))

    def close(self) -> None:
        pass


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time()}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbSink:
    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir), name=run_name,
            id=_wandb_id(run_dir), resume="allow", config=config,
            settings=wandb.Settings(quiet=True, console="off"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, kept in the directory, so a resumed run continues its curve."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class MetricLogger:
    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(wandb_cfg: WandbConfig, run_dir: Optional[Path], run_name: str, config: dict, total_steps: int,
                 is_main: bool) -> MetricLogger:
    """Rank 0 writes console, JSONL and wandb; other ranks write nothing."""
    if not is_main or run_dir is None:
        return MetricLogger([])
    sinks: list[MetricSink] = [ConsoleSink(total_steps), JsonlSink(run_dir / "metrics.jsonl")]
    if wandb_cfg.mode != "disabled":
        sinks.append(WandbSink(wandb_cfg, run_dir, run_name, config))
    return MetricLogger(sinks)
