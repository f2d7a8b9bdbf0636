"""Hybrid fwd+bwd kernel times past d_model 2048 (d_ff = 2.75 d_model rounded to 256, 0.5% of the
units active per token, 16384 tokens, bf16), for whichever tree is first on PYTHONPATH:

    PYTHONPATH=/tmp/old:/tmp/site python kernels/experiments/wide_shapes.py old [d_model ...]

(correctness at these widths: tests/gpu/test_hybrid.py::test_wide_d_model)
"""
import sys

import torch

from sparse_llm.kernels.bench_training import DW_KERNELS, _kernel_times
from sparse_llm.kernels.synthetic import hybrid_training_step, make_experiment_case

tag = sys.argv[1] if len(sys.argv) > 1 else "this tree"
for d_model in [int(a) for a in sys.argv[2:]] or [2048, 2304, 3072, 3584, 4096]:
    d_ff = round(2.75 * d_model / 256) * 256
    syn, _ = make_experiment_case(16384, d_model, d_ff, 0.005 * d_ff)
    times = _kernel_times(hybrid_training_step(syn))
    main = {"hy_forward": times.get("hy_forward", 0.0), "hy_dw": sum(times.get(k, 0.0) for k in DW_KERNELS),
            "hy_dx": times.get("hy_dx", 0.0)}
    print(f"{tag} d_model {d_model} d_ff {d_ff}: kernels {sum(times.values()):.3f} ms | "
          + ", ".join(f"{k} {v:.3f}" for k, v in main.items()), flush=True)
    del syn
    torch.cuda.empty_cache()
