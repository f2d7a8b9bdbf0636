"""Checkpoints through torch.distributed.checkpoint (DCP): sharded model and optimizer state that
reshard onto any world size, plus data-loader cursor, trainer and callback state, and per-rank RNG.

Layout: RUN_DIR/checkpoints/step_XXXXXXXX/ holds the DCP files and a COMPLETE marker. Every rank
writes into `step_XXXXXXXX.tmp/`; after a barrier rank 0 adds the marker and renames the folder,
so a crash mid-save never leaves a checkpoint that looks loadable. Checkpoints without the marker,
or that fail to load, are skipped with a warning naming them.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sparse_llm.parallel.distributed import barrier, rank

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def list_complete(run_dir: Path, warn: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(root.glob("step_*")):
        if path.name.endswith(".tmp"):
            continue
        if (path / COMPLETE).is_file():
            complete.append(path)
        elif warn:
            log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return complete


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep_latest: int, device: torch.device) -> Path:
    """Collective: every rank calls it. `extra` must be identical on all ranks (trainer, data state)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "extra": extra, _rng_key(rank()): _rng_state(device)}
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if rank() == 0:
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_complete(run_dir)[:-keep_latest]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _load(path: Path, model, optimizer, extra_template: dict[str, Any], device: torch.device) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state, "extra": extra_template}
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    rng_key = _rng_key(rank())
    same_rank_saved = any(key.startswith(rng_key + ".") for key in saved_keys)
    if same_rank_saved:
        state[rng_key] = _rng_state(device)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if same_rank_saved:
        torch.set_rng_state(state[rng_key]["torch"])
        if "cuda" in state[rng_key]:
            torch.cuda.set_rng_state(state[rng_key]["cuda"], device)
    return state["extra"]


def load_latest(run_dir: Path, model, optimizer, extra_template: dict[str, Any],
                device: torch.device) -> Optional[tuple[Path, dict[str, Any]]]:
    """Load the newest complete checkpoint that reads; returns (path, extra) or None.
    A corrupt one is skipped with a warning and the next older one is tried."""
    for path in reversed(list_complete(run_dir, warn=True)):
        try:
            return path, _load(path, model, optimizer, extra_template, device)
        except (Exception, CheckpointException) as error:  # corrupt or truncated: fall back to an older one
            log.warning("skipping unreadable checkpoint %s: %s", path, str(error).splitlines()[0][:300])
    return None
