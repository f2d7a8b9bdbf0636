"""The dW passes' shape (hybrid.DW_PASS_SHAPE: hy_dwy's 256-column chunks a slice, the tokens in hy_dwy's
and hy_dwx's per-warp cp.async rings), each shape's hy_dwy, hy_dwx and hy_dx device ms and the whole fwd+bwd, for the
training bench's 99.5%, 99% and heavy-tail cases (16384 tokens, 2048 x 5632, bf16), two rounds.

    PYTHONPATH=$PWD python kernels/experiments/dw_pass_shapes.py 4,4,8 4,2,4 2,8,16
"""
import sys

from triton.testing import do_bench

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_times
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

shapes = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [hybrid.DW_PASS_SHAPE]
default = hybrid.DW_PASS_SHAPE
print("case | shape | hy_fill_au hy_dwy hy_dwx hy_dx ms | fwd+bwd ms")
for level in (29.0, 58.0, -29.0):
    syn, label = make_experiment_case(16384, 2048, 5632, level)
    step = hybrid_training_step(syn)
    for _ in range(2):
        for shape in shapes:
            hybrid.DW_PASS_SHAPE = shape
            t = _kernel_times(step)
            ms = " ".join(f"{t.get(k, 0.0):.3f}" for k in ("hy_fill_au", "hy_dwy", "hy_dwx", "hy_dx"))
            print(f"{label} | {shape} | {ms} | {do_bench(step, warmup=10, rep=100):.3f}", flush=True)
    hybrid.DW_PASS_SHAPE = default
