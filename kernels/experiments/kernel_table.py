"""Every CUDA kernel's device time per hybrid fwd+bwd (profiler, mean of 5 calls) for the training
bench's 99.5%, 99% and heavy-tail cases (16384 tokens, 2048 x 5632, bf16). Runs whatever tree is first
on PYTHONPATH, so one copy of this script times two trees:

    PYTHONPATH=/tmp/old:/tmp/site python kernels/experiments/kernel_table.py old
"""
import sys

from sparse_llm.kernels.bench_training import _kernel_times
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

tag = sys.argv[1] if len(sys.argv) > 1 else "this tree"
for level in (29.0, 58.0, -29.0):
    syn, label = make_experiment_case(16384, 2048, 5632, level)
    rows = sorted(((ms, k) for k, ms in _kernel_times(hybrid_training_step(syn)).items()), reverse=True)
    total = sum(ms for ms, _ in rows)
    print(f"{tag} {label}: kernels {total:.3f} ms | " + ", ".join(f"{k[:28]} {ms:.3f}" for ms, k in rows[:14]),
          flush=True)
