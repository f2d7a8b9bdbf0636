"""Parameter and FLOP counts (dense-equivalent: as if every FFN unit were computed)."""
from __future__ import annotations

from sparse_llm.config import ModelConfig


def ffn_matrices(ffn_kind: str) -> int:
    return 2 if ffn_kind == "relu" else 3


def count_params(cfg: ModelConfig, ffn_kind: str = "relu_gated") -> int:
    """All parameters with the tied embedding counted once (the paper's convention)."""
    d = cfg.d_model
    per_layer = 4 * d * d + ffn_matrices(ffn_kind) * d * cfg.d_ff + 2 * d
    return cfg.vocab_size * d + cfg.n_layers * per_layer + d


def flops_per_token(cfg: ModelConfig, ffn_kind: str = "relu_gated", training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per weight (the LM head included) plus causal attention's
    QK^T and AV (2 x 2 x seq x d per layer, halved for causality); x3 for forward + backward."""
    d = cfg.d_model
    weights = cfg.n_layers * (4 * d * d + ffn_matrices(ffn_kind) * d * cfg.d_ff) + cfg.vocab_size * d
    attention = cfg.n_layers * 2 * cfg.seq_len * d
    forward = 2 * weights + attention
    return 3 * forward if training else forward
