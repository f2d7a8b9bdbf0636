"""Where one TwELL FFN call's time goes on the device: every kernel it launches (mean device time per
call), its span (first kernel start to last kernel end) and the idle time inside the span, from the
torch profiler over back-to-back calls; dense eager in the same run. bf16, 2048 x 5632 unless given.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/twell_timeline.py [--shape 2048x5632] [tokens] [active ...] [FusedConfig fields ...]

FusedConfig fields (e.g. `passes=2,pass_partial16=1`) each time one more TwELL variant; the default
configuration is always timed.
"""
import collections
import sys
from dataclasses import fields, replace

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_llm.kernels import twell
from sparse_llm.kernels.reference import ffn_reference, ffn_reference_fp32
from sparse_llm.kernels.synthetic import make_experiment_case

argv = sys.argv[1:]
d_model, d_ff = 2048, 5632
if argv[:1] == ["--shape"]:
    d_model, d_ff = (int(v) for v in argv[1].split("x"))
    argv = argv[2:]
tokens = int(argv[0]) if argv else 131072
levels = [float(a) for a in argv[1:] if "=" not in a] or [29.0, 61.0]
types = {f.name: f.type for f in fields(twell.FusedConfig)}
variants = {"default": twell.FusedConfig()}
for spec in (a for a in argv[1:] if "=" in a):
    pairs = [item.split("=") for item in spec.split(",")]
    variants[spec] = replace(twell.FusedConfig(), **{k: (float(v) if types[k] in (float, "float") else int(v)) for k, v in pairs})
calls = 20


def timeline(fn, label: str) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.name and not e.name.startswith("Memcpy") and e.device_time > 0),
                     key=lambda e: e.time_range.start)
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e3
    idle, end = 0.0, kernels[0].time_range.start  # over merged intervals, us
    for e in kernels:
        idle += max(0, e.time_range.start - end)
        end = max(end, e.time_range.end)
    by_name = collections.Counter()
    for e in kernels:
        by_name[e.name[:70]] += e.device_time
    print(f"{label}: {span / calls:.3f} ms a call (span), busy {(span - idle / 1e3) / calls:.3f}, "
          f"idle {idle / 1e3 / calls:.3f}", flush=True)
    for name, us in by_name.most_common():
        print(f"   {us / 1e3 / calls:8.4f} ms  {name}", flush=True)


for level in levels:
    syn, label = make_experiment_case(tokens, d_model, d_ff, level)
    x, wg, wu, wd = syn.x, syn.w_gate, syn.w_up, syn.w_down
    w_dt = wd.t().contiguous()
    ref = ffn_reference_fp32(x, wg, wu, wd)
    print(f"--- {d_model}x{d_ff}, {tokens} tokens, {label}", flush=True)
    timeline(lambda: ffn_reference(x, wg, wu, wd), "dense eager")
    for name, config in variants.items():
        twell.set_default_config(config)
        y = twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        timeline(lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt), f"TwELL {name} (rel. error {err:.2e})")
    twell.set_default_config(None)
    syn = x = wg = wu = wd = w_dt = ref = y = None  # freed before the next inputs
    torch.cuda.empty_cache()
