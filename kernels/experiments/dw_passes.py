"""hy_dwy and hy_dwx (the two weight-gradient passes, NOTES_hybrid v17) alone, per case and per
setting of hybrid.DWX_CHUNKS (columns a hy_dwx warp takes, in chunks of 256) and hybrid.DW_SWEEP:
device ms a call (profiler), for the training bench's 99.5%, 99% and heavy-tail cases (16384 tokens,
2048 x 5632, bf16).

    python kernels/experiments/dw_passes.py [chunks ...]   (default: 2 4 8)
"""
import sys

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_ms
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

chunk_settings = [int(v) for v in sys.argv[1:]] or [2, 4, 8]
print("case | DWX_CHUNKS sweep | hy_dwy hy_dwx ms")
for level in (29.0, 58.0, -29.0):  # 99.5%, 99%, heavy tail
    syn, label = make_experiment_case(16384, 2048, 5632, level)
    step = hybrid_training_step(syn)
    for chunks in chunk_settings:
        for sweep in (True, False):
            hybrid.DWX_CHUNKS, hybrid.DW_SWEEP = chunks, sweep
            dwy, dwx = (_kernel_ms(step, k) for k in ("hy_dwy", "hy_dwx"))
            print(f"{label} | {chunks} {int(sweep)} | {dwy:.3f} {dwx:.3f}", flush=True)
    hybrid.DWX_CHUNKS, hybrid.DW_SWEEP = 4, True
