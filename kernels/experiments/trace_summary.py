"""Summary of torch.profiler chrome traces (as `bench_model --keep DIR telemetry.profile_steps=2`
writes them): the GPU's kernel span, busy and idle time, the heaviest kernels, and the RoPE kernels'
time (how the v9 profile showed that the fused RoPE kernel never ran in the model).

    python kernels/experiments/trace_summary.py DIR/*/*/profile/trace_*.json
"""
import collections
import json
import sys

for path in sys.argv[1:]:
    kernels = sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    span = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) / 1e3
    busy = sum(e["dur"] for e in kernels) / 1e3
    gaps, end = [], kernels[0]["ts"]  # idle time between kernels (over merged intervals), us
    for e in kernels:
        if e["ts"] > end:
            gaps.append(e["ts"] - end)
        end = max(end, e["ts"] + e["dur"])
    long_gaps = [g for g in gaps if g > 50]
    print(path, f"kernel span {span:.1f} ms, busy {busy:.1f} ms, idle {sum(gaps) / 1e3:.1f} ms, "
          f"gaps>50us {sum(long_gaps) / 1e3:.1f} ms in {len(long_gaps)}")
    by_name = collections.Counter()
    for e in kernels:
        by_name[e["name"][:60]] += e["dur"]
    for name, us in by_name.most_common(14):
        print(f"   {us / 1e3:8.2f} ms {name}")
    print("   rope kernels:", {n: round(us / 1e3, 2) for n, us in by_name.items() if "rope" in n})
