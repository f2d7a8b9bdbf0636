"""The training loop: gradient accumulation, clipping, schedules, periodic eval, logging, checkpoints.

Everything that must survive a restart is in the checkpoint: model, optimizer and RNG (handled by
sparse_llm.train.checkpoint) plus `extra_state()` (step, data cursor, callbacks). The loop reads
device values back to the host only at log, eval and checkpoint steps.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from sparse_llm.config import TrainConfig
from sparse_llm.model.flops import flops_per_token
from sparse_llm.parallel.distributed import World, all_reduce_sum
from sparse_llm.parallel.fsdp import defers_grad_sync, reshard, set_grad_sync
from sparse_llm.sparsity.l1 import l1_coefficient
from sparse_llm.sparsity.stats import SparsityStats
from sparse_llm.train import checkpoint
from sparse_llm.train.loggers import MetricLogger
from sparse_llm.train.loss import lm_loss
from sparse_llm.train.schedule import lr_at
from sparse_llm.train.signals import StopRequest

log = logging.getLogger("sparse_llm")
GIB = 2**30


class Callback:
    """Extra work hooked into the loop (telemetry, re-initialization, profiling). Override what you need.

    `metrics` is None except on log steps, where a callback may add its own entries to it. Anything a
    callback must carry across a restart goes in its state_dict (saved with the checkpoint under
    `callbacks/<class name>`).
    """

    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def on_micro_batch_end(self, trainer: "Trainer", output) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Optional[dict[str, float]]) -> None:
        pass

    def on_eval_start(self, trainer: "Trainer") -> None:
        pass

    def on_eval_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer: "Trainer") -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class IntervalTotals:
    """Device-side sums over the current logging interval (no host sync until read)."""
    ce_sum: torch.Tensor
    l1_term: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    skipped: int = 0
    tokens: int = 0
    data_time: float = 0.0
    start: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device) -> "IntervalTotals":
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), start=time.perf_counter())


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader, val_loader, logger: MetricLogger, run_dir: Path, grad_accum: int,
                 callbacks: Optional[list[Callback]] = None):
        self.cfg, self.world, self.model, self.optimizer = cfg, world, model, optimizer
        self.train_loader, self.val_loader, self.logger = train_loader, val_loader, logger
        self.run_dir, self.grad_accum = run_dir, grad_accum
        self.callbacks = callbacks or []
        self.step = 0
        self.tokens_seen = 0
        self.device = world.device
        self.token_normalizer = cfg.tokens_per_step / world.size
        self.defer_grad_sync = self.grad_accum > 1 and defers_grad_sync(cfg.parallel, world.size)
        self.stats = SparsityStats(cfg.model.n_layers, cfg.model.d_ff, world.device)
        self.flops_per_token = flops_per_token(cfg.model, cfg.sparsity.ffn)
        self.last_metrics: dict[str, float] = {}
        self._lr = self._l1_coef = 0.0
        self.consecutive_skips = 0
        self.stopped_by = ""  # why fit() returned before max_steps (a signal, max_minutes), if it did

    # ---- state -------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Everything resumable besides model, optimizer and RNG (which the checkpoint handles)."""
        return {
            "trainer": {"step": self.step, "tokens_seen": self.tokens_seen},
            "data": self.train_loader.state_dict(),
            "callbacks": {type(c).__name__: c.state_dict() for c in self.callbacks},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = state["trainer"]["step"]
        self.tokens_seen = state["trainer"]["tokens_seen"]
        self.train_loader.load_state_dict(state["data"])
        for callback in self.callbacks:
            callback.load_state_dict(state["callbacks"].get(type(callback).__name__, {}))

    def save_checkpoint(self) -> None:
        path = checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, self.extra_state(),
                               self.cfg.checkpoint.keep_latest, self.device)
        if self.world.is_main:
            log.info("saved checkpoint %s", path)

    def resume(self) -> Optional[Path]:
        """Continue from the newest complete checkpoint of the run directory, if any."""
        loaded = checkpoint.load_latest(self.run_dir, self.model, self.optimizer, self.extra_state(), self.device)
        if loaded is None:
            return None
        path, extra = loaded
        self.load_extra_state(extra)
        return path

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if self.step >= cfg.max_steps:
            log.info("run already finished at step %d (max_steps=%d)", self.step, cfg.max_steps)
            return self.last_metrics
        self.model.train()
        for callback in self.callbacks:
            callback.on_fit_start(self)
        stop = StopRequest(cfg.max_minutes, cfg.checkpoint.signal_check_interval)
        try:
            self._loop(stop)
        finally:
            stop.restore()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        return self.last_metrics

    def _loop(self, stop: StopRequest) -> None:
        cfg = self.cfg
        totals = IntervalTotals.zeros(self.device)
        while self.step < cfg.max_steps:
            self._train_step(totals)
            self.step += 1
            metrics = None
            if self.step % cfg.logging.interval == 0 or self.step == cfg.max_steps:
                metrics = self._interval_metrics(totals)
                totals = IntervalTotals.zeros(self.device)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                metrics = {**(metrics or {}), **self.evaluate()}
            for callback in self.callbacks:
                callback.on_step_end(self, self.step, metrics)
            if metrics is not None:
                self.logger.log(metrics, self.step)
                self.last_metrics.update(metrics)
            saved = self.step % cfg.checkpoint.interval == 0 or self.step == cfg.max_steps
            if saved:
                self.save_checkpoint()
            if self.step < cfg.max_steps and stop.should_stop(self.step):
                log.info("stopping at step %d (%s): saving a checkpoint and exiting", self.step, stop.reason)
                if not saved:
                    self.save_checkpoint()
                self.stopped_by = stop.reason
                return

    def _train_step(self, totals: IntervalTotals) -> None:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim.lr, cfg.max_steps, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        l1_coef = l1_coefficient(cfg.sparsity.l1, self.step, cfg.sparsity.l1_warmup_steps)
        ce_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        l1_term = torch.zeros((), device=self.device, dtype=torch.float64)
        for index in range(self.grad_accum):
            last = index == self.grad_accum - 1
            if self.defer_grad_sync and (index == 0 or last):  # the setting holds until changed
                set_grad_sync(self.model, sync=last, keep_unsharded=not cfg.parallel.reshard_after_forward)
            data_start = time.perf_counter()
            inputs, targets = self.train_loader.next_batch()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            totals.data_time += time.perf_counter() - data_start
            output = self.model(inputs)
            parts = lm_loss(output, targets, l1_coef, self.token_normalizer)
            output = output._replace(logits=None)  # the backward does not read them: freed before it runs
            parts.total.backward()
            ce_sum += parts.ce_sum
            l1_term += parts.l1_term
            self.stats.update(output.ffn_stats)
            for callback in self.callbacks:
                callback.on_micro_batch_end(self, output)
            totals.tokens += targets.numel()
        grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip)
        if cfg.optim.nonfinite == "skip" and not torch.isfinite(grad_norm).item():
            self._skip_step(totals)
            return
        self.consecutive_skips = 0
        totals.ce_sum += ce_sum
        totals.l1_term += l1_term
        totals.grad_norm += grad_norm.double()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals.steps += 1
        self.tokens_seen += self.cfg.tokens_per_step
        self._lr, self._l1_coef = lr, l1_coef

    def _skip_step(self, totals: IntervalTotals) -> None:
        """Drop this step's gradients (its loss sums are not added); stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        totals.skipped += 1
        self.consecutive_skips += 1
        log.warning("step %d: non-finite gradient norm, step skipped", self.step + 1)
        if self.consecutive_skips > self.cfg.optim.max_skipped_steps:
            raise TrainingDiverged(f"{self.consecutive_skips} consecutive non-finite steps at step {self.step + 1}; "
                                   f"lower optim.lr or raise schedule.warmup_steps, and resume from the last "
                                   f"checkpoint in {self.run_dir}")

    def _interval_metrics(self, totals: IntervalTotals) -> dict[str, float]:
        if totals.steps == 0:
            return {"optim/skipped_steps": float(totals.skipped)}
        sums = all_reduce_sum(torch.stack([totals.ce_sum, totals.l1_term]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - totals.start
        global_tokens = totals.steps * self.cfg.tokens_per_step
        ce = sums[0].item() / global_tokens
        # each rank's l1_term is normalized by its own tokens (tokens_per_step / world): average the ranks
        l1_term = sums[1].item() / totals.steps / self.world.size
        grad_norm = totals.grad_norm.item() / totals.steps
        if not (math.isfinite(ce) and math.isfinite(l1_term) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {self.step} (ce={ce}, l1_term={l1_term}, grad_norm={grad_norm}); "
                f"lower optim.lr or raise schedule.warmup_steps, and resume from the last checkpoint in {self.run_dir}")
        tokens_per_sec = totals.tokens / elapsed
        metrics = {
            "loss/ce": ce, "loss/l1_term": l1_term, "loss/l1_coef": self._l1_coef, "loss/total": ce + l1_term,
            "optim/grad_norm": grad_norm, "optim/lr": self._lr,
            "perf/tokens_per_sec_per_gpu": tokens_per_sec, "perf/step_time_s": elapsed / totals.steps,
            "perf/data_time_pct": 100.0 * totals.data_time / elapsed,
            "perf/model_tflops_per_gpu": tokens_per_sec * self.flops_per_token / 1e12,
            "train/tokens_seen": float(self.tokens_seen),
        }
        if self.cfg.optim.nonfinite == "skip":
            metrics["optim/skipped_steps"] = float(totals.skipped)
        if self.device.type == "cuda":
            metrics["mem/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            metrics["mem/max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        metrics.update(self.stats.summarize())
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None or self.cfg.eval_batches == 0:
            return {}
        self.model.eval()
        for callback in self.callbacks:
            callback.on_eval_start(self)
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        for inputs, targets in self.val_loader.val_batches(self.cfg.eval_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            output = self.model(inputs)
            parts = lm_loss(output, targets, 0.0, 1.0)
            sums[0] += parts.ce_sum
            sums[1] += targets.numel()
        self.model.train()
        reshard(self.model)  # forwards with no backward leave the last block and the root unsharded
        all_reduce_sum(sums)
        if sums[1].item() == 0:
            return {}
        ce = (sums[0] / sums[1]).item()
        metrics = {"val/ce": ce, "val/ppl": math.exp(min(ce, 50.0))}
        for callback in self.callbacks:
            callback.on_eval_end(self, metrics)
        return metrics


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all ranks' shards (clipping to max_norm when > 0), without a host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.detach()
