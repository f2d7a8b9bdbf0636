"""Where one hybrid FFN fwd+bwd's time goes, calls back to back (the host free to run ahead): span
per call, device busy and idle time, per-kernel device time, and every idle gap over --min-us
charged to what the host was doing (kernels/experiments/gap_attribution.py); then the same for dense
eager. Writes the chrome traces to --trace-dir when given.

    PYTHONPATH=$PWD python kernels/experiments/hybrid_timeline.py [--active 29] [--tokens 16384]
"""
import argparse
import collections
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_llm.kernels import reference
from sparse_llm.kernels.experiments import gap_attribution as ga
from sparse_llm.kernels.hybrid import hybrid_ffn
from sparse_llm.kernels.synthetic import make_synthetic_ffn


def summarize(trace_path: str, calls: int, label: str, min_us: float) -> None:
    kernels, launches, ops = ga.load(trace_path)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    idle, end = 0.0, kernels[0]["ts"]
    by_name = collections.Counter()
    for k in kernels:
        idle += max(0.0, k["ts"] - end)
        end = max(end, k["ts"] + k["dur"])
        by_name[k["name"][:60]] += k["dur"]
    print(f"{label}: span {span / 1e3 / calls:.3f} ms a call, busy {(span - idle) / 1e3 / calls:.3f}, "
          f"idle {idle / 1e3 / calls:.3f}", flush=True)
    for name, us in by_name.most_common(16):
        print(f"   {us / 1e3 / calls:8.4f} ms  {name}")
    starts = {tid: [e["ts"] for e in o] for tid, o in ops.items()}
    longs = {tid: [e for e in o if e["dur"] > ga.LONG_US] for tid, o in ops.items()}
    by_op, by_next = collections.Counter(), collections.Counter()
    for start, stop, kernel in ga.gaps(kernels, min_us):
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        chain = [] if launch is None else ga.enclosing(ops.get(launch["tid"], []), starts.get(launch["tid"], []),
                                                       longs.get(launch["tid"], []), (start + stop) / 2)
        by_op[" > ".join(e["name"][:60] for e in chain[-3:]) or "(no op)"] += stop - start
        by_next[kernel["name"][:50]] += stop - start
    print(f"   gaps over {min_us:.0f} us by the host ops at their midpoint (ms a call):")
    for name, us in by_op.most_common(10):
        print(f"     {us / 1e3 / calls:7.3f}  {name}")
    print("   ... by the kernel that ended them:")
    for name, us in by_next.most_common(8):
        print(f"     {us / 1e3 / calls:7.3f}  {name}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--active", type=float, default=29.0)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--min-us", type=float, default=10.0)
    p.add_argument("--trace-dir", default="")
    p.add_argument("--stack", action="store_true", help="record Python frames (gaps charged to functions)")
    args = p.parse_args()
    s = make_synthetic_ffn(args.tokens, 2048, 5632, args.active, seed=0)
    leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
    dy = torch.randn_like(s.x)
    dl1 = torch.tensor(1e-3, device="cuda")

    def ours():
        y, l1, _, _ = hybrid_ffn(*leaves)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])

    def dense():
        y = reference.ffn_reference(*leaves)
        return torch.autograd.grad([y], leaves, [dy])

    out_dir = args.trace_dir or tempfile.mkdtemp()
    os.makedirs(out_dir, exist_ok=True)
    for label, fn in (("hybrid", ours), ("dense eager", dense)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        for _ in range(args.calls):
            fn()
        events[1].record()
        events[1].synchronize()
        print(f"{label}: {events[0].elapsed_time(events[1]) / args.calls:.3f} ms a call back to back "
              "(no profiler)", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.stack) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        path = os.path.join(out_dir, f"trace_{label.replace(' ', '_')}.json")
        prof.export_chrome_trace(path)
        summarize(path, args.calls, label, args.min_us)
    print(json.dumps({"tokens": args.tokens, "active": args.active}))


if __name__ == "__main__":
    main()
