"""Same-run A/B of the attention's RoPE: the PyTorch formula on views of the qkv projection (as the
model ran before the fused op) against `sparse_llm.kernels.rope.rope_qkv`, fwd+bwd at a model shape
(8 x 2048 tokens, 32 heads of 64, bf16), median of 20 with L2 flushed, and the memory the forward
leaves alive for the backward (with the qkv projection before it and SDPA after it, as in the model).

    PYTHONPATH=$PWD python kernels/experiments/rope_ab.py [batch=8] [seq=2048] [heads=32] [head_dim=64]
"""
import sys

import torch
import torch.nn.functional as F

from sparse_llm.kernels.bench_training import _flush_buffer, time_ms
from sparse_llm.kernels.rope import rope_qkv, rope_reference, split_heads
from sparse_llm.model.rope import rope_tables

batch, seq, heads, head_dim = (int(a) for a in (sys.argv[1:] + ["8", "2048", "32", "64"][len(sys.argv) - 1:]))
cos, sin = rope_tables(seq, head_dim, 10000.0, device="cuda")
qkv = torch.randn(batch, seq, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
grads = [torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def formula(t):
    q, k, v = split_heads(t, heads)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


def fused(t):
    return rope_qkv(t, cos, sin, heads)


def step(rope):
    return torch.autograd.grad(rope(qkv), qkv, grads)


def saved_mib(rope):
    """Memory the forward through the qkv projection, RoPE and SDPA leaves alive for the backward
    (beyond the projection's input and weight), as in the model."""
    x = torch.randn(batch, seq, heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(3 * heads * head_dim, heads * head_dim, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = F.scaled_dot_product_attention(*rope(F.linear(x, weight)), is_causal=True)
    alive = torch.cuda.memory_allocated() - base
    del out
    return alive / 2**20


flush = _flush_buffer()
print(f"RoPE fwd+bwd, batch {batch}, seq {seq}, {heads} heads of {head_dim}, bf16, "
      f"{torch.cuda.get_device_name()}")
for round_ in range(2):
    t_formula, t_fused = time_ms(lambda: step(formula), 20, flush), time_ms(lambda: step(fused), 20, flush)
    print(f"round {round_}: formula {t_formula:.3f} ms, fused {t_fused:.3f} ms, {t_formula / t_fused:.1f}x")
print(f"alive after RoPE + SDPA forward: formula {saved_mib(formula):.0f} MiB, fused {saved_mib(fused):.0f} MiB")
