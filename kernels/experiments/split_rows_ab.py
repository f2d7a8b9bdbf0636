"""Same-run A/B of the long-row split (hybrid v8): FFN fwd+bwd at 16384 tokens, 2048 x 5632, about 29 active
units (light tail 0.15 and heavy tail 0.2), with SPLIT_ROWS = 256 (on) and 0 (off), two rounds, L2 flushed
and warm. As it ran on 2026-11-24 (H100), before the (dg, du) ELL was widened to BACKWARD_ELL_WIDTH.

    PYTHONPATH=$PWD python kernels/experiments/split_rows_ab.py
"""
import torch
from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import time_ms, _flush_buffer
from sparse_llm.kernels.synthetic import make_synthetic_ffn
flush = _flush_buffer()
for active, tail in ((29.0, 0.15), (29.0, 0.2)):
    s = make_synthetic_ffn(16384, 2048, 5632, active, tail=tail, seed=0)
    leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
    dy = torch.randn_like(s.x); dl1 = torch.tensor(1e-3, device="cuda")
    def ours():
        y, l1, _, _ = hybrid.hybrid_ffn(*leaves)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])
    nf = torch.empty(0, device="cuda")
    for rnd in range(2):
        for rows in (256, 0):
            hybrid.SPLIT_ROWS = rows
            print(f"tail {tail} rows {rows}: flushed {time_ms(ours, 20, flush):.3f} ms, warm {time_ms(ours, 20, nf):.3f} ms", flush=True)
