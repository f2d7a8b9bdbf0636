"""Checkpoints of everything a run needs to continue exactly: model, optimizer, data-loader cursor,
trainer state and RNG. Each lives in `checkpoints/step_XXXXXXXX/`, written to a temporary folder
and renamed into place with a COMPLETE marker, so a crash mid-save never leaves a checkpoint that
looks loadable. Single-process format (torch.save); the sharded DCP format replaces the payload
when the run is distributed.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
PAYLOAD = "state.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(root.glob("step_*")):
        if (path / COMPLETE).is_file() and (path / PAYLOAD).is_file():
            complete.append(path)
        elif not path.name.endswith(".tmp"):
            log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return complete


def save(run_dir: Path, step: int, state: dict[str, Any], keep_latest: int) -> Path:
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / PAYLOAD)
    (tmp / COMPLETE).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_complete(run_dir)[:-keep_latest]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint that loads; a corrupt one is skipped with a warning."""
    for path in reversed(list_complete(run_dir)):
        try:
            return path, torch.load(path / PAYLOAD, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or corrupt file: fall back to an older one
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
    return None
