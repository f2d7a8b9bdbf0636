"""How long are the rows (active units per token) and the columns (tokens per unit) of bench_model's
calibrated models? The warp-per-token kernels (hy_forward, hy_dx, the TwELL fused stage) take as long
as their longest row at least; hy_dw as its longest column part. Per layer, on another micro-batch
than the calibration one: row mean / p99 / p99.9 / max, rows of >= 64, 128, 512 units, the sequence
positions of the longest rows, and the hottest unit's token count.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/row_lengths.py [0p5b] [29]
"""
import sys

import torch

from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.study.bench_model import calibrate_gate_sparsity, gate_activity

from calibrated_model import model_trainer  # this folder's scripts run with it on sys.path

model_name = sys.argv[1] if len(sys.argv) > 1 else "0p5b"
target = float(sys.argv[2]) if len(sys.argv) > 2 else 29.0
world = init_distributed("cuda")


with model_trainer(model_name, world) as trainer:
    calibration = trainer.train_loader.next_batch()[0].to(world.device)
    other = trainer.train_loader.next_batch()[0].to(world.device)
    calibrate_gate_sparsity(trainer.model, calibration, target)
    seq = other.shape[1]
    print("layer | row mean p99 p99.9 max | rows >=64 >=128 >=512 | positions of the 4 longest | hottest unit's tokens")
    for layer, active in enumerate(gate_activity(trainer.model, other)):
        rows = active.sum(1).float()
        q = torch.quantile(rows, torch.tensor([0.99, 0.999], device=rows.device)).tolist()
        top = torch.topk(rows, 4)
        positions = [(int(i) % seq, int(v)) for v, i in zip(top.values, top.indices)]
        print(f"{layer:5d} | {rows.mean():.1f} {q[0]:.0f} {q[1]:.0f} {rows.max():.0f} | "
              f"{int((rows >= 64).sum())} {int((rows >= 128).sum())} {int((rows >= 512).sum())} | "
              f"{positions} | {int(active.sum(0).max())}", flush=True)
shutdown()
