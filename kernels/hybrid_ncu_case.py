"""One hybrid FFN fwd+bwd at the bench shape (99.5% sparse), for Nsight Compute:
ncu -k regex:'hy_(forward|dw|dx)' python kernels/hybrid_ncu_case.py"""
import torch

from sparse_llm.kernels.hybrid import hybrid_ffn
from sparse_llm.kernels.synthetic import make_synthetic_ffn

s = make_synthetic_ffn(16384, 2048, 5632, 28.16, tail=0.0, dtype=torch.bfloat16, device="cuda", seed=1)
leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
dy = torch.randn_like(s.x)
for _ in range(2):
    y, l1, _, _ = hybrid_ffn(*leaves)
    torch.autograd.grad([y, l1], leaves, [dy, torch.tensor(0.1, device="cuda")])
torch.cuda.synchronize()
print("done")
