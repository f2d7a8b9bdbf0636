"""Apply parallelism to single-device model code, in one fixed order:
activation checkpointing -> per-block torch.compile -> FSDP2 `fully_shard` per block, then the root.

The model is built on the meta device and materialized after sharding, so no rank ever holds the
whole unsharded model. A world of one goes through the same path (FSDP2 over a mesh of one).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from sparse_llm.config import ParallelConfig


def build_mesh(world_size: int, device: torch.device, cfg: ParallelConfig) -> DeviceMesh:
    """1-D mesh for FSDP, or (replicate, shard) for HSDP when parallel.replicate > 1."""
    if cfg.replicate > 1:
        return init_device_mesh(device.type, (cfg.replicate, world_size // cfg.replicate),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))


def _checkpoint_blocks(model: nn.Module, cfg: ParallelConfig) -> None:
    if cfg.activation_checkpointing == "none":
        return
    every = 1 if cfg.activation_checkpointing == "full" else cfg.selective_every
    for index, block in enumerate(model.blocks):
        if index % every == 0:
            model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def _compile_blocks(model: nn.Module) -> None:
    for index, block in enumerate(model.blocks):
        model.blocks[index] = torch.compile(block, fullgraph=False)


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction on GPU (or when asked); fp32 otherwise.
    Forward inputs are not cast: the blocks' activations are bf16 already, and the float32 RoPE
    tables they are handed must stay float32 (bf16 angles lose position precision, and the fused
    RoPE kernel takes float32 tables only)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def apply_parallelism(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, precision: str,
                      device: torch.device) -> nn.Module:
    _checkpoint_blocks(model, cfg)
    if cfg.compile:
        _compile_blocks(model)
    policy = mixed_precision(precision, device)
    last = len(model.blocks) - 1
    for index, block in enumerate(model.blocks):
        # the last block's backward runs right after the forward: resharding it would only make the
        # backward wait for a fresh all-gather
        reshard = cfg.reshard_after_forward and index < last
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # the root holds the tied embedding / LM head and the final norm; its params stay unsharded
    # after forward since the LM head runs last and backward needs them at once
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def defers_grad_sync(cfg: ParallelConfig, world_size: int) -> bool:
    """parallel.grad_sync: `last`, or `auto` on a world of one, where the unsharded gradients are no
    larger than the sharded ones."""
    return cfg.grad_sync == "last" or (cfg.grad_sync == "auto" and world_size == 1)


def set_grad_sync(model: nn.Module, sync: bool, keep_unsharded: bool) -> None:
    """Set before each micro-batch when gradient sync is deferred. `sync=False`: the backward adds its
    gradients to unsharded float32 ones instead of reduce-scattering them, and with `keep_unsharded`
    the parameters stay unsharded for the next micro-batch's forward (pass it only when they are
    unsharded through forward and backward anyway, i.e. parallel.reshard_after_forward=false: else
    the forward would hold every block's parameters). The step's last micro-batch (`sync=True`)
    reduces the sum once."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        model.set_reshard_after_backward(sync or not keep_unsharded)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back in its sharded state. The last block and the root stay
    unsharded after a forward (their backward comes first); a forward with no backward after it
    leaves them so, and an in-place edit of their parameters would then change only the unsharded
    copies, which the next backward discards. Edit parameters after calling this."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
