"""hy_dw's cp.async pipeline shape (hybrid.DW_STAGES stages x hybrid.DW_BATCH tokens a batch, two CTA
barriers a batch) against the default, same inputs, same run: hy_dw's device time (profiler, median
of 3 alternating rounds) and the gradients' largest relative difference from the default's.
2048 x 5632, bf16, 16384 tokens unless given.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_pipeline_sweep.py [tokens] [stages,batch ...]
"""
import statistics
import sys

import torch

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_ms, rel
from sparse_llm.kernels.synthetic import hybrid_training_step, make_synthetic_ffn

args = sys.argv[1:]
tokens = int(args[0]) if args and "," not in args[0] else 16384
shapes = [tuple(int(v) for v in a.split(",")) for a in args if "," in a] or [(2, 4), (2, 6), (4, 2), (2, 8), (4, 4)]
default = (hybrid.DW_STAGES, hybrid.DW_BATCH)


def case(name: str, active: float, tail: float) -> None:
    step = hybrid_training_step(make_synthetic_ffn(tokens, 2048, 5632, active, tail, torch.bfloat16, "cuda", 0))
    times, grads = {}, {}
    for r in range(3):
        for shape in ([default] + shapes)[:: 1 if r % 2 == 0 else -1]:
            hybrid.DW_STAGES, hybrid.DW_BATCH = shape
            grads[shape] = step()
            times.setdefault(shape, []).append(_kernel_ms(step, "hy_dw"))
    hybrid.DW_STAGES, hybrid.DW_BATCH = default
    base = statistics.median(times[default])
    for shape in [default] + shapes:
        ms = statistics.median(times[shape])
        diff = max(rel(a, b) for a, b in zip(grads[shape], grads[default]))
        print(f"{tokens} tokens, {name}: stages {shape[0]} batch {shape[1]}: hy_dw {ms:.3f} ms "
              f"({ms / base:.3f}x default), gradients within {diff:.1e}", flush=True)


for name, active, tail in (("99.5%", 29.0, 0.0), ("99%", 57.0, 0.0), ("heavy tail", 29.0, 0.2)):
    case(name, active, tail)
