"""hy_dw on the tensor cores (hybrid.DW_MMA, hy_dw_mma: four units an item) against the float32 FMA kernel
(hy_dw), same inputs, same run, alternating rounds: the dW kernel alone (profiler), the whole fwd+bwd
(CUDA events, L2 flushed), and the two kernels' gradients against each other (the GPU tests hold both
to the float32 reference).
2048 x 5632, bf16, the training benchmark's cases.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_mma_ab.py [tokens ...]
"""
import sys

import torch

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _flush_buffer, _kernel_ms, rel, time_ms
from sparse_llm.kernels.loader import resident_blocks
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn

token_counts = [int(a) for a in sys.argv[1:]] or [16384, 65536]
flush = _flush_buffer()
kernel_name = {True: "hy_dw_mma", False: "hy_dw"}
dw = hybrid._kernel("hy_dw_mma", torch.device("cuda"), 2048, True, torch.bfloat16)
print("hy_dw_mma CTAs an SM:", resident_blocks(dw, 512, 52 * (2 * 2048 + 16)), flush=True)
for tokens in token_counts:
    for name, active, tail in (("99.5%", 29.0, 0.0), ("99%", 57.0, 0.0), ("heavy tail", 29.0, 0.2)):
        syn = make_synthetic_ffn(tokens, 2048, 5632, active, tail, torch.bfloat16, "cuda", 0)
        step = hybrid_training_step(syn)
        grads, rounds = {}, {True: [], False: []}
        for r in range(3):
            for mma in ((True, False) if r % 2 == 0 else (False, True)):
                hybrid.DW_MMA = mma
                grads[mma] = step()
                rounds[mma].append((_kernel_ms(step, kernel_name[mma]), time_ms(step, 10, flush)))
        hybrid.DW_MMA = True
        diff = [rel(a, b) for a, b in zip(grads[True], grads[False])]
        med = {k: [sorted(v[i] for v in rows)[1] for i in range(2)] for k, rows in rounds.items()}
        print(f"{tokens} tokens, {name}: dW kernel mma {med[True][0]:.3f} ms vs fma {med[False][0]:.3f} ms | "
              f"fwd+bwd {med[True][1]:.3f} vs {med[False][1]:.3f} ms | gradients (dx, dWg, dWu, dWd) mma vs fma "
              f"{' '.join(f'{d:.1e}' for d in diff)} | rounds {rounds}", flush=True)
        del step, grads
        torch.cuda.empty_cache()
