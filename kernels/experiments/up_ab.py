"""Token-blocked up-projection (twell_up.cu) on vs off, same inputs, same run, alternating rounds:
whole TwELL FFN, the sparse stage (up + fused, or fused alone), and the up kernel alone; dense eager
in the same run. 2048 x 5632, 131072 tokens, bf16 unless given.
    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/up_ab.py [tokens] [active ...]
"""
import sys
from dataclasses import replace

import torch
from triton.testing import do_bench

from sparse_llm.kernels import twell
from sparse_llm.kernels.reference import ffn_reference, ffn_reference_fp32
from sparse_llm.kernels.synthetic import make_experiment_case

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
levels = [float(a) for a in sys.argv[2:]] or [29.0, 61.0, -29.0]  # negative: heavy tail at that mean
d_model, d_ff = 2048, 5632
bench = lambda fn: do_bench(fn, warmup=25, rep=150, return_mode="median")  # noqa: E731
for level in levels:
    syn, label = make_experiment_case(tokens, d_model, d_ff, level)
    x, wg, wu, wd = syn.x, syn.w_gate, syn.w_up, syn.w_down
    w_dt = wd.t().contiguous()
    ref = ffn_reference_fp32(x, wg, wu, wd)
    gate, counts, packed, _ = twell.twell_gate_pack(x, wg, 32, write_all=True)
    h_slots = torch.empty_like(packed)
    base = twell.FusedConfig()
    res = {}
    for rnd in range(3):
        for on in ((1, 0) if rnd % 2 == 0 else (0, 1)):
            cfg = replace(base, up_blocked=on)
            twell.set_default_config(cfg)
            y = twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t_all = bench(lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt))
            t_sparse = bench(lambda: twell.twell_sparse_stage(x, gate, counts, packed, wu, w_dt, config=cfg, in_place=False))
            t_up = bench(lambda: twell.twell_up_blocked(x, counts, packed, wu, out=h_slots, config=cfg)) if on else float("nan")
            res.setdefault(on, []).append((t_all, t_sparse, t_up, err))
    twell.set_default_config(None)
    by_tokens = {b: bench(lambda: twell.twell_up_blocked(x, counts, packed, wu, out=h_slots, config=replace(base, up_blocked=1, up_tokens=b)))
                 for b in (128, 192, 256)}
    print(f"  up kernel alone by up_tokens: {by_tokens}", flush=True)
    t_dense = bench(lambda: ffn_reference(x, wg, wu, wd))
    med = {on: [sorted(r[i] for r in rows)[1] for i in range(4)] for on, rows in res.items()}
    print(f"{d_model}x{d_ff} {tokens} tok, {label}: dense {t_dense:.2f} ms | "
          f"up on: total {med[1][0]:.2f} ({t_dense / med[1][0]:.3f}x) sparse stage {med[1][1]:.2f} (up {med[1][2]:.2f}) err {med[1][3]:.1e} | "
          f"up off: total {med[0][0]:.2f} ({t_dense / med[0][0]:.3f}x) sparse stage {med[0][1]:.2f} err {med[0][3]:.1e}  rounds {res}",
          flush=True)
    syn = x = wg = wu = wd = w_dt = ref = gate = counts = packed = h_slots = None  # freed before the next inputs
    torch.cuda.empty_cache()
