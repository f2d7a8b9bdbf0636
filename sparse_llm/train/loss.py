"""The training objective: token-sum cross entropy plus the L1 term, both over the global token count."""
from __future__ import annotations

from typing import NamedTuple

import torch

from sparse_llm.kernels.cross_entropy import cross_entropy_sum
from sparse_llm.model.transformer import ModelOutput
from sparse_llm.sparsity.l1 import l1_term


class LossParts(NamedTuple):
    total: torch.Tensor    # what backward() is called on
    ce_sum: torch.Tensor   # detached: summed token cross entropy of this micro-batch
    l1_term: torch.Tensor  # detached: this micro-batch's share of the L1 term


def lm_loss(output: ModelOutput, targets: torch.Tensor, l1_coef: float, token_normalizer: float) -> LossParts:
    """`token_normalizer` is the number of tokens that one optimizer step averages over on this rank
    (global tokens per step / world size, since gradient reduction averages over ranks)."""
    logits = output.logits
    ce_sum = cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    total = ce_sum / token_normalizer
    l1 = torch.zeros((), device=logits.device)
    l1_sums = [stats.l1_sum for stats in output.ffn_stats if stats is not None]
    if l1_coef > 0 and l1_sums:
        l1 = l1_term(l1_sums, l1_coef, token_normalizer)
        total = total + l1
    return LossParts(total, ce_sum.detach(), l1.detach())
