"""Preemption: SIGTERM / SIGUSR1, a stop file, and a wall-clock budget ask the trainer to finish the
current step, save a checkpoint and exit 0.

The stop file (path in $SPARSE_LLM_STOP_FILE) is how launch/slurm.sbatch passes SLURM's early
warning (--signal=B:USR1@120, caught by the batch script) to every rank on every node, whatever
launcher sits in between. The signal handler only sets a flag. Ranks agree on stopping through one small all-reduce every
`check_interval` steps, so every rank saves the same step (a collective) and no rank waits forever.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("sparse_llm")


class StopRequest:
    def __init__(self, max_minutes: float = 0.0, check_interval: int = 1,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes > 0 else None
        self.check_interval = check_interval
        self.reason = ""
        stop_file = os.environ.get("SPARSE_LLM_STOP_FILE")
        self.stop_file = Path(stop_file) if stop_file else None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def should_stop(self, step: int) -> bool:
        """Collective every `check_interval` steps: True on all ranks if any rank asks to stop."""
        if step % self.check_interval:
            return False
        if self.deadline is not None and time.monotonic() > self.deadline and not self.reason:
            self.reason = "max_minutes"
        if self.stop_file is not None and not self.reason and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        local = torch.tensor([1 if self.reason else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            if backend == "nccl":
                local = local.cuda()
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        stop = bool(local.item())
        if stop and not self.reason:
            self.reason = "another rank"
        return stop
