"""The training objective: token-sum cross entropy plus the L1 term, both over the global token count."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_llm.model.transformer import ModelOutput
from sparse_llm.sparsity.l1 import l1_term


class LossParts(NamedTuple):
    total: torch.Tensor    # what backward() is called on
    ce_sum: torch.Tensor   # detached: summed token cross entropy of this micro-batch
    l1_term: torch.Tensor  # detached: this micro-batch's share of the L1 term


def lm_loss(output: ModelOutput, targets: torch.Tensor, l1_coef: float, token_normalizer: float,
            chunk_tokens: int = 0) -> LossParts:
    """`token_normalizer` is the number of tokens that one optimizer step averages over on this rank
    (global tokens per step / world size, since gradient reduction averages over ranks);
    `chunk_tokens` > 0 computes the cross entropy in chunks (`cross_entropy_sum`)."""
    logits = output.logits
    ce_sum = cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk_tokens)
    total = ce_sum / token_normalizer
    l1 = torch.zeros((), device=logits.device)
    l1_sums = [stats.l1_sum for stats in output.ffn_stats if stats is not None]
    if l1_coef > 0 and l1_sums:
        l1 = l1_term(l1_sums, l1_coef, token_normalizer)
        total = total + l1
    return LossParts(total, ce_sum.detach(), l1.detach())


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Summed float32 cross entropy of logits [tokens, vocab] (any float dtype). With chunk_tokens > 0
    the tokens go in chunks, each under activation checkpointing: the float32 copy of the logits, the
    log-softmax it saves for the backward (3.2 GB each at 16384 tokens and a 49152 vocabulary) and
    their gradients exist for one chunk at a time, recomputed in the backward."""
    if chunk_tokens <= 0 or chunk_tokens >= logits.shape[0]:
        return _cross_entropy_sum(logits, targets)
    chunks = zip(logits.split(chunk_tokens), targets.split(chunk_tokens))
    return sum(checkpoint(_cross_entropy_sum, part, part_targets, use_reentrant=False)
               for part, part_targets in chunks)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")
