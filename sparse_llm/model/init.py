"""Initialization that gives the same weights at any world size.

Each parameter's full tensor is drawn from one generator in a fixed order and each rank keeps its
own shard, so a model sharded over N ranks starts from exactly the weights of a single process.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    full = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
    full.normal_(0.0, std, generator=generator)
    _assign_full(param, full.to(param.device if not isinstance(param, DTensor) else param.to_local().device))


@torch.no_grad()
def ones_(param: torch.Tensor) -> None:
    param.fill_(1.0)
