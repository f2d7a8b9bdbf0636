"""Benchmark inputs with a chosen activation sparsity (DESIGN.md section 11).

X ~ N(0, 1) with each row scaled by exp(s * N(0, 1)) (heavy tail for s > 0) and feature 0 set to 1;
Wg, Wu ~ N(0, 1/d), Wd ~ N(0, 1/d_ff); then Wg[:, 0] = -t, where t is the quantile of the gate
pre-activations that leaves `mean_active` active units per token on average.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticFFN:
    x: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor

    def active_summary(self) -> dict[str, float]:
        """Measured mean / p99 / max active per token and the worst 256-wide tile."""
        gate = torch.nn.functional.linear(self.x.float(), self.w_gate.float())
        active = gate > 0
        per_token = active.sum(1).float()
        d_ff = active.shape[1]
        tiles = active[:, : d_ff - d_ff % 256].reshape(active.shape[0], -1, 256).sum(-1)
        return {
            "mean": per_token.mean().item(),
            "p99": per_token.quantile(0.99).item() if per_token.numel() <= 2**24 else float("nan"),
            "max": per_token.max().item(),
            "worst_tile": tiles.max().item() if tiles.numel() else 0.0,
        }


def make_synthetic_ffn(
    tokens: int,
    d_model: int,
    d_ff: int,
    mean_active: float,
    tail: float = 0.15,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int | None = None,
    calibration_tokens: int = 4096,
) -> SyntheticFFN:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
    x = randn(tokens, d_model) * torch.exp(tail * randn(tokens, 1))
    x[:, 0] = 1.0
    w_gate = randn(d_ff, d_model) / d_model**0.5
    w_up = randn(d_ff, d_model) / d_model**0.5
    w_down = randn(d_model, d_ff) / d_ff**0.5
    w_gate[:, 0] = 0.0
    calib = x[:calibration_tokens]
    pre = calib @ w_gate.T
    threshold = torch.quantile(pre.flatten()[: 2**24], 1.0 - mean_active / d_ff)
    w_gate[:, 0] = -threshold
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return SyntheticFFN(cast(x), cast(w_gate), cast(w_up), cast(w_down))


def make_experiment_case(tokens: int, d_model: int, d_ff: int, level: float,
                         dtype: torch.dtype = torch.bfloat16) -> tuple[SyntheticFFN, str]:
    """The experiment scripts' case: `level` active units per token on CUDA (negative: a heavy tail
    with that mean), seed 0, and its label."""
    tail = 0.2 if level < 0 else 0.0
    syn = make_synthetic_ffn(tokens, d_model, d_ff, abs(level), tail, dtype, "cuda", 0)
    return syn, f"mean active {abs(level):.0f}{' heavy tail' if tail else ''}"


def hybrid_training_step(syn: SyntheticFFN, l1_grad: float = 0.1):
    """The experiment scripts' training step: a closure running one hybrid FFN fwd+bwd of `syn` (x and
    the weights as leaves, a fixed random dy, dL/dl1_sum = l1_grad) and returning the gradients."""
    from sparse_llm.kernels import hybrid

    leaves = [t.detach().requires_grad_() for t in (syn.x, syn.w_gate, syn.w_up, syn.w_down)]
    dy = torch.randn_like(syn.x)
    dl1 = torch.tensor(l1_grad, device=syn.x.device)

    def step():
        y, l1, _, _ = hybrid.hybrid_ffn(*leaves)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])

    return step
