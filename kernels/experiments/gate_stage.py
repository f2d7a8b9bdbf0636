"""The hybrid forward's gate stage at the training bench's shape (16384 tokens, 2048 x 5632, bf16, 99.5%
and heavy tail): cuBLAS's G = X Wg^T plus hy_pack (what hybrid.py runs) against the TwELL gate kernel with
the pack in its epilogue (twell_gate_pack, Hopper only) for a few slot counts, each timed alone.
Whether the hybrid forward could take its format from the TwELL kernel's output instead of G.

    python kernels/experiments/gate_stage.py
"""
import numpy as np
import torch
from triton.testing import do_bench

from sparse_llm.kernels import hybrid, twell
from sparse_llm.kernels import hybrid_reference as ref
from sparse_llm.kernels.loader import launch, ptr
from sparse_llm.kernels.synthetic import make_experiment_case

for level in (29.0, -29.0):
    syn, label = make_experiment_case(16384, 2048, 5632, level)
    x, wg = syn.x, syn.w_gate
    n, d_ff = x.shape[0], wg.shape[0]
    g = ref.gate_preact(x, wg)
    mrow = torch.empty(n, ref.words(d_ff), dtype=torch.int32, device="cuda")
    tprefix = torch.empty(n, ref.tiles(d_ff), dtype=torch.int32, device="cuda")
    ell = torch.zeros(n, 128, 2, dtype=torch.float32, device="cuda")
    pack = hybrid._kernel("hy_pack", x.device, 2048, True, x.dtype)
    args = (ptr(g), ptr(mrow), ptr(tprefix), ptr(ell), np.int32(n), np.int32(d_ff), np.int32(128))
    t_gemm = do_bench(lambda: ref.gate_preact(x, wg), warmup=20, rep=300)
    t_pack = do_bench(lambda: launch(pack, ((n + 7) // 8,), (256,), args), warmup=20, rep=300)
    line = f"{label}: cuBLAS {t_gemm:.3f} + hy_pack {t_pack:.3f} = {t_gemm + t_pack:.3f} ms"
    if twell.gate_kernel_supported(x.device, x.dtype, 256, 32):
        for slots in (8, 16, 32):
            t = do_bench(lambda: twell.twell_gate_pack(x, wg, slots), warmup=20, rep=300)
            stats = twell.twell_gate_pack(x, wg, slots)[3].tolist()
            line += f" | twell_gate_pack slots {slots}: {t:.3f} ms (overflowing tiles {stats[0]})"
    print(line, flush=True)
