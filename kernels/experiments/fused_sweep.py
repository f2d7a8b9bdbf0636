"""Fused-stage launch configs at 98.9% and 99.5% (131072 tokens, 2048x5632), same run, 3 rounds.
    PYTHONPATH=$PWD python kernels/experiments/fused_sweep.py
"""
from dataclasses import replace
import torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from triton.testing import do_bench

D = twell.FusedConfig()
configs = {"default": D, "group2": replace(D, group=2, regs=168), "slice2048": replace(D, slice_width=2048, regs=255),
           "prefetch0": replace(D, prefetch=0), "fill0.75": replace(D, grid_fill=0.75), "regs96": replace(D, regs=96)}
print(torch.cuda.get_device_name(), flush=True)
for active in (61, 29):
    syn = make_synthetic_ffn(131072, 2048, 5632, active, 0.0, torch.bfloat16, "cuda", 0)
    x, wg, wu = syn.x, syn.w_gate, syn.w_up
    wdt = syn.w_down.t().contiguous()
    res = {k: [] for k in configs}
    for rnd in range(3):
        for name, cfg in (list(configs.items()) if rnd % 2 == 0 else list(configs.items())[::-1]):
            twell.set_default_config(cfg)
            try:
                res[name].append(float(do_bench(lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=wdt), warmup=10, rep=150, return_mode="median")))
            except Exception as e:
                print(name, "FAILED", str(e)[:200], flush=True)
    twell.set_default_config(None)
    for k, v in res.items():
        if v:
            print(f"active {active} {k}: median {sorted(v)[len(v) // 2]:.3f} ms {['%.3f' % t for t in v]}", flush=True)
    syn = x = wg = wu = wdt = None  # freed before the next inputs
    torch.cuda.empty_cache()
