"""The L1 penalty on the FFN hidden activations.

Per layer, l1_layer = (sum over tokens and units of |h|) / tokens; the penalty is
coeff x mean over layers of l1_layer, added to the token-mean cross entropy. Both terms are divided
by the step's *global* token count, so the loss does not depend on gradient accumulation or world
size (see README, "L1 normalization").
"""
from __future__ import annotations

import torch


def l1_coefficient(base: float, step: int, warmup_steps: int) -> float:
    """The coefficient at `step`, ramped linearly from 0 over `warmup_steps` when that is > 0."""
    if warmup_steps <= 0:
        return base
    return base * min(1.0, step / warmup_steps)


def l1_term(l1_sums: list[torch.Tensor], coefficient: float, token_normalizer: float) -> torch.Tensor:
    """coeff x mean over layers of (per-layer |h| sums / token_normalizer)."""
    return coefficient * torch.stack(l1_sums).mean() / token_normalizer
