"""Device time per active pair of each hybrid kernel as the token count grows (2048 x 5632, bf16,
29 active a token, uniform): where a kernel's per-pair time rises once x and dy (8 KB a token) no
longer fit L2, that kernel pays for DRAM, not for L2 or latency.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/kernel_scaling.py [tokens ...]
"""
import sys

import torch

from sparse_llm.kernels.bench_training import _main_kernel_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn



def measure(tokens: int) -> None:
    s = make_synthetic_ffn(tokens, 2048, 5632, 29.0, 0.0, torch.bfloat16, "cuda", 0)
    step = hybrid_training_step(s)
    pairs = (s.x.float() @ s.w_gate.float().t() > 0).sum().item()
    ms = _main_kernel_ms(step)  # "hy_dw": the dW kernels of either design
    per = " ".join(f"{ms[k] * 1e6 / pairs:6.3f}" for k in ms)
    print(f"{tokens} | {tokens * 8192 / 2**20:.0f} | {pairs} | {per} | {ms['hy_dw']:.3f}", flush=True)


print("tokens | x+dy MB | pairs | ns/pair: hy_forward hy_dw hy_dx | hy_dw ms")
for tokens in [int(a) for a in sys.argv[1:]] or [2048, 4096, 8192, 16384, 32768]:
    measure(tokens)
