"""Neuron passes of the fused stage (FusedConfig.passes), same run, 3 rounds, per shape and level
(NOTES_twell.md v5).    PYTHONPATH=$PWD python kernels/experiments/passes_ab.py
"""
from dataclasses import replace
import torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from triton.testing import do_bench
D = twell.FusedConfig()
for shape, actives, options in [((2048, 5632), (29, 61, 115), (1, 2, 3)), ((2048, 8192), (42.7, 88.7), (2, 3, 4)),
                                ((1024, 2816), (14.7,), (1, 2))]:
    for active in actives:
        syn = make_synthetic_ffn(131072, shape[0], shape[1], active, 0.0, torch.bfloat16, "cuda", 0)
        x, wg, wu = syn.x, syn.w_gate, syn.w_up
        wdt = syn.w_down.t().contiguous()
        res = {p: [] for p in options}
        for rnd in range(3):
            for p in (options if rnd % 2 == 0 else options[::-1]):
                twell.set_default_config(replace(D, passes=p))
                res[p].append(float(do_bench(lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=wdt), warmup=10, rep=120, return_mode="median")))
        twell.set_default_config(None)
        print(shape, active, {p: round(sorted(v)[1], 3) for p, v in res.items()}, flush=True)
        syn = x = wg = wu = wdt = None  # freed before the next inputs
        torch.cuda.empty_cache()
