"""Per-kernel device time (hy_forward, the weight-gradient kernels (hy_dw until v19, hy_fill_au + hy_dwy + hy_dwx since v20 and in the
two-pass experiment of NOTES_hybrid v17, commit 70f8700), hy_dx) and the whole hybrid fwd+bwd back to back for the
training bench's 99.5%, 99% and heavy-tail cases (16384 tokens, 2048 x 5632, bf16), each line tagged.
For A/B runs of two trees on one machine (NOTES_hybrid v14, `results/hybrid_dw_pair_vs_diet_h100.log`):

    PYTHONPATH=/tmp/old:/tmp/site python kernels/experiments/fwd_bwd_cases.py old
    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/fwd_bwd_cases.py new
"""
import sys

from triton.testing import do_bench

from sparse_llm.kernels.bench_training import _kernel_times
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

tag = sys.argv[1] if len(sys.argv) > 1 else "this tree"
for level in (29.0, 58.0, -29.0):  # 99.5%, 99%, heavy tail
    syn, label = make_experiment_case(16384, 2048, 5632, level)
    step = hybrid_training_step(syn)
    t = _kernel_times(step)
    ms = [t.get("hy_forward", 0.0), sum(t.get(k, 0.0) for k in ("hy_dw", "hy_fill_au", "hy_dwy", "hy_dwx")),
          t.get("hy_dx", 0.0)]
    total = do_bench(step, warmup=10, rep=200)
    print(f"{tag} {label} | {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f} | {total:.3f}", flush=True)
