"""hy_dw with the first K rows of x and dy kept in L2 (evict-last, the rest evict-first): hy_dw reads
x and dy from DRAM once per wave of running units, so kept rows should cut its DRAM traffic by K / N;
the kept lines may cost the kernels after it their L2 hits (weights). Per kernel device time and the
whole fwd+bwd (back to back), 2048 x 5632 bf16, 29 active a token, uniform, alternating rounds.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_keep.py [tokens] [keep ...]
"""
import sys

import torch
from triton.testing import do_bench

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
keeps = [int(a) for a in sys.argv[2:]] or [0, 1024, 2048, 3072, 4096, 6144]
syn = make_synthetic_ffn(tokens, 2048, 5632, 29.0, 0.0, torch.bfloat16, "cuda", 0)
step = hybrid_training_step(syn)
print(f"{tokens} tokens; keep rows | hy_forward hy_dw hy_dx ms | fwd+bwd ms (queued)")
for round_ in range(2):
    for keep in keeps:
        hybrid.DW_KEEP_ROWS = keep
        ms = [_kernel_ms(step, k) for k in ("hy_forward", "hy_dw", "hy_dx")]
        total = do_bench(step, warmup=10, rep=200)
        print(f"{keep:6d} | {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f} | {total:.3f}", flush=True)
