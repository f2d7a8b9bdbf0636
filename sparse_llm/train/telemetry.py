"""Telemetry callbacks (energy, memory, MFU, sparsity media, profiling) chosen from the config."""
from __future__ import annotations

from pathlib import Path

from sparse_llm.config import TrainConfig
from sparse_llm.parallel.distributed import World


def build_callbacks(cfg: TrainConfig, world: World, run_dir: Path) -> list:
    return []
