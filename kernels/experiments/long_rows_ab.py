"""Long rows in the hybrid kernels, as in a calibrated model's deep layers (dw_model.py: up to ~5000
active units in the first positions of each sequence, hundreds of rows past 128, a sixth of the pairs
past the backward ELL): the uniform 99.5% case (16384 tokens, 2048 x 5632, bf16) with the first
`positions` rows of each 2048-token sequence scaled up (longer rows, as in the models). Per kernel and
whole fwd+bwd time for bounds on the split rows (SPLIT_ROWS) and widths of the backward's (dg, du) ELL
(BACKWARD_ELL_WIDTH: pairs past it are recomputed in hy_dx), alternating rounds.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/long_rows_ab.py [positions] [scale]
"""
import sys

import torch
from triton.testing import do_bench

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _main_kernel_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn

positions = int(sys.argv[1]) if len(sys.argv) > 1 else 24
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
syn = make_synthetic_ffn(16384, 2048, 5632, 29.0, 0.0, torch.bfloat16, "cuda", 0)
x = syn.x.float()
for start in range(0, x.shape[0], 2048):  # longer rows first, shorter further in (a model's first positions)
    for p in range(positions):
        x[start + p, 1:] *= scale * (1 - p / positions) + 1
syn.x = x.to(torch.bfloat16)
rows = (syn.x.float() @ syn.w_gate.float().t() > 0).sum(1).float()
print(f"rows: mean {rows.mean():.1f} max {rows.max():.0f}, >=128 {int((rows >= 128).sum())}, >=512 "
      f"{int((rows >= 512).sum())}, >=2048 {int((rows >= 2048).sum())}; pairs past 512: "
      f"{100 * (rows - 512).clamp(min=0).sum() / rows.sum():.1f}%")
step = hybrid_training_step(syn)
variants = [(256, 512), (1024, 512), (256, 1024), (1024, 1024), (1024, 2048)]
print("SPLIT_ROWS BACKWARD_ELL_WIDTH | hy_forward hy_dw hy_dx ms | fwd+bwd ms (queued)")
for round_ in range(2):
    for split_rows, width_d in variants:
        hybrid.SPLIT_ROWS, hybrid.BACKWARD_ELL_WIDTH = split_rows, width_d
        ms = list(_main_kernel_ms(step).values())  # hy_forward, dW, hy_dx
        total = do_bench(step, warmup=10, rep=100)
        print(f"{split_rows:5d} {width_d:5d} | {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f} | {total:.3f}", flush=True)
