"""Dead-neuron re-initialization (the paper's appendix C.3), off by default (`sparsity.reinit_dead`).

Training is cut into consecutive windows of `sparsity.reinit_window_tokens` global tokens. During a
window each rank adds, on device, how many of its tokens every FFN unit fired on (the
`neuron_counts` the FFN reports per micro-batch; no host sync). After the optimizer step that closes
the window, the counts are summed over ranks (one all-reduce) and every unit that fired on no token
of any rank has its gate row (its up row for the non-gated `relu` FFN) replaced by

    W_row <- 0.9 W_row + 0.1 N(0, 0.02^2)

Only those rows change; the other matrices and the optimizer state are left as they are.

Sharded weights: under FSDP2 `weight` is a DTensor sharded on dim 0 (Shard(0), or
(Replicate, Shard(0)) for HSDP). The update works on `weight.to_local()` in place: the full-size
noise and dead-row mask are drawn identically on every rank (a generator seeded by seed, step and
layer) and cut to this rank's rows with `distribute_tensor(..., src_data_rank=None)`, which slices
exactly as the parameter is sharded (no communication). The result therefore does not depend on the
world size. The assumption is that the FFN row dimension (d_ff) is the one sharded, or that nothing is.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from sparse_llm.model.ffn import FeedForward
from sparse_llm.train.trainer import Callback

log = logging.getLogger("sparse_llm")

KEEP = 0.9        # weight on the old row
NOISE_STD = 0.02  # std of the fresh N(0, std^2) part, weighted by 1 - KEEP


def reinit_target(ffn: FeedForward) -> torch.Tensor:
    """The matrix whose rows decide whether a unit fires: the gate (relu_gated) or up (relu) weight."""
    if ffn.kind == "swiglu":
        raise ValueError("dead-neuron re-initialization needs a ReLU FFN (relu_gated or relu), not swiglu")
    return ffn.gate.weight if ffn.gate is not None else ffn.up.weight


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor, cut as `like` (a DTensor parameter or a plain tensor) is."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def reinit_rows_(weight: torch.Tensor, dead: torch.Tensor, generator: torch.Generator,
                 keep: float = KEEP, noise_std: float = NOISE_STD) -> None:
    """In place: rows r of `weight` with dead[r] become keep * W[r] + (1 - keep) * N(0, noise_std^2).

    `dead` is a bool vector over the full (global) rows; the noise is drawn for the full shape from
    `generator`, so every rank draws the same and keeps its own rows.
    """
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    shape = tuple(weight.shape)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = _local(noise.to(local.device), weight)
    mask = _local(dead.to(local.device).view(-1, 1).expand(shape).contiguous(), weight)
    fresh = keep * local.float() + (1.0 - keep) * noise_std * noise
    local.copy_(torch.where(mask, fresh, local.float()).to(local.dtype))


def _generator_seed(seed: int, step: int, layer: int) -> int:
    return (seed * 1_000_003 + step * 4099 + layer) % (2**63 - 1)


class DeadNeuronReinit(Callback):
    def __init__(self, n_layers: int, d_ff: int, window_tokens: int, seed: int = 0,
                 keep: float = KEEP, noise_std: float = NOISE_STD):
        self.n_layers, self.d_ff, self.window_tokens = n_layers, d_ff, window_tokens
        self.seed, self.keep, self.noise_std = seed, keep, noise_std
        self.fires = torch.zeros(n_layers, d_ff, dtype=torch.int64)
        self.tokens_in_window = 0
        self.window_has_stats = True    # False when a micro-batch came without statistics (kernel path)
        self.total_units = 0            # re-initialized since the run started
        self.units_since_log = 0
        self.targets: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, cfg) -> "DeadNeuronReinit":
        return cls(cfg.model.n_layers, cfg.model.d_ff, cfg.sparsity.reinit_window_tokens, cfg.seed)

    def on_fit_start(self, trainer) -> None:
        ffns = [m for m in trainer.model.modules() if isinstance(m, FeedForward)]
        if len(ffns) != self.n_layers:
            raise ValueError(f"dead-neuron re-initialization found {len(ffns)} FFN modules, expected {self.n_layers}")
        self.targets = [reinit_target(ffn) for ffn in ffns]
        self.device = trainer.device
        self.fires = self.fires.to(trainer.device)

    def on_micro_batch_end(self, trainer, output) -> None:
        stats = output.ffn_stats
        if not stats or any(s is None for s in stats):
            self.window_has_stats = False
            return
        self.fires += torch.stack([s.neuron_counts for s in stats])

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        self.tokens_in_window += trainer.cfg.tokens_per_step
        if self.tokens_in_window >= self.window_tokens:
            self._close_window(step)
        if metrics is not None:
            metrics["sparsity/reinit_units"] = float(self.units_since_log)
            metrics["sparsity/reinit_units_total"] = float(self.total_units)
            self.units_since_log = 0

    @torch.no_grad()
    def _close_window(self, step: int) -> None:
        flag = torch.tensor([0 if self.window_has_stats else 1], dtype=torch.int64, device=self.fires.device)
        reduced = _all_reduce(torch.cat([self.fires.flatten(), flag]))  # one collective per window
        fires, ranks_without_stats = reduced[:-1].view_as(self.fires), reduced[-1]
        if ranks_without_stats.item() == 0:
            dead = fires == 0
            per_layer = dead.sum(1).tolist()  # the one host sync of the window
            for layer, count in enumerate(per_layer):
                if count:
                    target = self.targets[layer]
                    local = target.to_local() if isinstance(target, DTensor) else target
                    generator = torch.Generator(device=local.device)
                    generator.manual_seed(_generator_seed(self.seed, step, layer))
                    reinit_rows_(target, dead[layer], generator, self.keep, self.noise_std)
            units = int(sum(per_layer))
            self.total_units += units
            self.units_since_log += units
        else:
            log.warning("dead-neuron re-initialization skipped the window ending at step %d: the FFN path "
                        "reported no activation statistics", step)
        self.fires.zero_()
        self.tokens_in_window = 0
        self.window_has_stats = True

    def state_dict(self) -> dict[str, Any]:
        # the window's counts summed over ranks (identical on all ranks, as the checkpoint requires);
        # a unit is dead iff its count is 0, which the sum keeps, so the resumed window decides the same
        # before fit (the template a resume loads into) the counts are zeros on the CPU: no collective, which
        # NCCL could not run on a CPU tensor anyway
        fires = _all_reduce(self.fires).cpu() if self.targets else self.fires.cpu().clone()
        return {"fires": fires, "tokens_in_window": self.tokens_in_window,
                "window_has_stats": self.window_has_stats, "total_units": self.total_units}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = self.fires.device
        self.fires = state["fires"].to(device=device, dtype=torch.int64).clone()
        self.tokens_in_window = int(state["tokens_in_window"])
        self.window_has_stats = bool(state["window_has_stats"])
        self.total_units = int(state["total_units"])


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """A summed copy over all ranks (the input is not modified)."""
    out = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
