"""Llama-style decoder: RMSNorm, RoPE, causal MHA, an FFN variant, tied embeddings, no biases.

Single-device model code: parallelism (FSDP2, activation checkpointing, compile) is applied from
outside by sparse_llm.parallel, and the model can be built on the meta device and materialized
with `init_weights()`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from sparse_llm.config import ModelConfig
from sparse_llm.model import init
from sparse_llm.model.attention import Attention
from sparse_llm.model.ffn import FeedForward, FFNStats
from sparse_llm.model.rope import rope_tables


class ModelOutput(NamedTuple):
    logits: Optional[torch.Tensor]       # [batch, seq, vocab]; the trainer drops them after the loss
    ffn_stats: list[Optional[FFNStats]]  # one per layer; None for the dense SwiGLU FFN


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_kind: str, kernel: str):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, ffn_kind, kernel)

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, Optional[FFNStats]]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        ffn_out, stats = self.ffn(self.ffn_norm(x))
        return x + ffn_out, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_kind: str = "relu_gated", kernel: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, ffn_kind, kernel) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self._set_rope_tables()

    def _set_rope_tables(self) -> None:
        device = self.embed.weight.device
        cos, sin = rope_tables(self.cfg.seq_len, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta,
                               device=None if device.type == "meta" else device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter (also after building on the meta device and `to_empty`).
        The result depends on `seed` only, not on how the parameters are sharded."""
        device = self.rope_cos.device
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        init.normal_(self.embed.weight, std, generator)
        for block in self.blocks:
            block = getattr(block, "_checkpoint_wrapped_module", block)
            block = getattr(block, "_orig_mod", block)
            for linear in (block.attn.qkv, block.ffn.gate, block.ffn.up):
                if linear is not None:
                    init.normal_(linear.weight, std, generator)
            init.normal_(block.attn.out.weight, residual_std, generator)
            init.normal_(block.ffn.down.weight, residual_std, generator)
            init.ones_(block.attn_norm.weight)
            init.ones_(block.ffn_norm.weight)
        init.ones_(self.norm.weight)
        cos, sin = rope_tables(self.cfg.seq_len, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta,
                               device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        seq = tokens.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"input of {seq} tokens exceeds model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        stats = []
        for block in self.blocks:
            x, layer_stats = block(x, cos, sin)
            stats.append(layer_stats)
        logits = nn.functional.linear(self.norm(x), self.embed.weight)
        return ModelOutput(logits, stats)
