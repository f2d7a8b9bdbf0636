"""kernel=auto: route each FFN layer to the sparse kernels only where they are faster than dense.

Every micro-batch folds each layer's measured active fraction into a device-side moving average
with hysteresis (kernels.hybrid.HybridRouter: no host sync). At log steps, where the trainer syncs
anyway, the decisions are read back: a layer trains on the hybrid kernels below the training
crossover and runs inference on TwELL below the inference crossover; both crossovers come from
whole-model and kernel benchmarks. All layers start on the dense path.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from sparse_llm.model.ffn import FeedForward
from sparse_llm.train.trainer import Callback

# Training crossover from whole training steps, not from the FFN benchmark (0.93% there): with the
# v7 hybrid kernels on an H100 (sparse_llm/study/results/bench_models_*v7_h100*, d 2048, d_ff 5632),
# a 1.5B step at 0.38% active (21 of 5632 units) ran 1.19x dense, and steps at 0.6-0.76% ran
# 0.975x (0.5B) to 1.07x. A layer trains on the hybrid kernels once its average falls below 0.45%
# (crossover x (1 - band)) and returns to dense above 0.6%, so auto never trains where a whole
# model measured slower than dense. kernel=hybrid forces the kernels at any sparsity.
TRAINING_CROSSOVER_ACTIVE_FRAC = 0.006


class KernelRouting(Callback):
    """`training` / `inference`: whether the hybrid / TwELL kernels can take this run at all (shape
    and precision, `run.kernel_problems`); where not, every layer stays on the dense path there."""

    def __init__(self, d_model: int, d_ff: int, training: bool = True, inference: bool = True):
        self.d_model, self.d_ff = d_model, d_ff
        self.training, self.inference = training, inference
        self.router = None
        self.ffns: list[FeedForward] = []
        self._pending_state: Optional[dict[str, Any]] = None

    def on_fit_start(self, trainer) -> None:
        from sparse_llm.kernels.hybrid import HybridRouter

        self.ffns = [m for m in trainer.model.modules() if isinstance(m, FeedForward)]
        self.router = HybridRouter(len(self.ffns), device=trainer.device, crossover=TRAINING_CROSSOVER_ACTIVE_FRAC)
        if self._pending_state:
            self.router.load_state_dict(self._pending_state)
        self._apply()

    @torch.no_grad()
    def on_micro_batch_end(self, trainer, output) -> None:
        for layer, stats in enumerate(output.ffn_stats):
            if stats is not None:
                tokens = stats.tile_counts.shape[0]
                self.router.observe(layer, stats.tile_counts.sum() / float(tokens * self.d_ff))

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if metrics is None:
            return
        self.router.sync()
        self._apply()
        metrics["kernel/layers_on_kernel"] = float(sum(f.route_training for f in self.ffns))
        metrics["kernel/layers_on_inference_kernel"] = float(sum(f.route_inference for f in self.ffns))

    def _apply(self) -> None:
        from sparse_llm.kernels.twell import twell_is_faster

        averages = self.router.ema.tolist()
        for layer, ffn in enumerate(self.ffns):
            ffn.route_training = self.training and self.router.use_hybrid[layer]
            ffn.route_inference = self.inference and twell_is_faster(averages[layer], self.d_model, self.d_ff)

    def state_dict(self) -> dict[str, Any]:
        return self.router.state_dict() if self.router is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.router is None:
            self._pending_state = state
        else:
            self.router.load_state_dict(state)
            self._apply()
