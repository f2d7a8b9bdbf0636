"""hy_dw with two units an item (DW_PAIR, their tokens walked together: twice the units per wave of
running CTAs, so x and dy are re-read from DRAM half as often) against one, same run, alternating
rounds: per kernel device time and the whole fwd+bwd back to back (2048 x 5632, bf16).

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_pair_ab.py [tokens ...]
"""
import sys

from triton.testing import do_bench

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

print("case | DW_PAIR | hy_forward hy_dw hy_dx ms | fwd+bwd ms (queued)")
for tokens in [int(a) for a in sys.argv[1:]] or [16384, 65536]:
    for level in (29.0, 58.0, -29.0):  # 99.5%, 99%, heavy tail
        syn, label = make_experiment_case(tokens, 2048, 5632, level)
        step = hybrid_training_step(syn)
        for round_ in range(2):
            for pair in (False, True):
                hybrid.DW_PAIR = pair
                ms = [_kernel_ms(step, k) for k in ("hy_forward", "hy_dw", "hy_dx")]
                total = do_bench(step, warmup=10, rep=100)
                print(f"{tokens} {label} | {int(pair)} | {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f} | {total:.3f}", flush=True)
        del syn, step
