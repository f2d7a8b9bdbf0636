"""hy_dw's token sweep (hybrid.DW_SWEEP, hybrid.cu "Token sweep") on vs off, same inputs, same run,
alternating rounds: hy_dw alone (profiler) and the whole fwd+bwd (CUDA events, L2 flushed), with the
gradients of the two orders compared. 2048 x 5632, bf16, the training benchmark's cases.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_sweep_ab.py [tokens ...]
"""
import sys

import torch

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _flush_buffer, _kernel_ms, rel, time_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn

token_counts = [int(a) for a in sys.argv[1:]] or [16384, 65536]
flush = _flush_buffer()
for tokens in token_counts:
    for name, active, tail in (("99.5%", 29.0, 0.0), ("99%", 57.0, 0.0), ("heavy tail", 29.0, 0.2)):
        step = hybrid_training_step(make_synthetic_ffn(tokens, 2048, 5632, active, tail, torch.bfloat16, "cuda", 0))
        grads, rounds = {}, {True: [], False: []}
        for r in range(3):
            for sweep in ((True, False) if r % 2 == 0 else (False, True)):
                hybrid.DW_SWEEP = sweep
                grads[sweep] = step()
                rounds[sweep].append((_kernel_ms(step, "hy_dw"), time_ms(step, 10, flush)))
        hybrid.DW_SWEEP = True
        diff = max(rel(a, b) for a, b in zip(grads[True], grads[False]))
        med = {k: [sorted(v[i] for v in rows)[1] for i in range(2)] for k, rows in rounds.items()}
        print(f"{tokens} tokens, {name}: hy_dw sweep {med[True][0]:.3f} ms vs from token 0 {med[False][0]:.3f} ms | "
              f"fwd+bwd {med[True][1]:.3f} vs {med[False][1]:.3f} ms | gradients differ by {diff:.1e} (rel.) | "
              f"rounds {rounds}", flush=True)
        del step, grads
        torch.cuda.empty_cache()
