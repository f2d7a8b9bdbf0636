"""Where the GPU waits on the host, from torch.profiler chrome traces (as `bench_model --keep DIR
telemetry.profile_steps=3` writes them): every idle gap between kernels longer than --min-us is
charged to what the launching thread was doing at the gap's midpoint (its innermost CPU op, and the
chain of enclosing ops) and to the launch that ended the gap.

    python kernels/experiments/gap_attribution.py DIR/*/*/profile/trace_*.json [--min-us 50] [--top 25]
"""
import argparse
import bisect
import collections
import json


def load(path):
    events = json.load(open(path))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = collections.defaultdict(list)  # thread -> cpu ops sorted by start
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and e.get("ph") == "X":
            ops[e["tid"]].append(e)
    for thread_ops in ops.values():
        thread_ops.sort(key=lambda e: e["ts"])
    return kernels, launches, ops


LONG_US = 20_000  # ops longer than this (steps, whole forwards) are checked one by one; shorter ones by a window


def enclosing(thread_ops, starts, long_ops, ts):
    """The ops of one thread that contain time ts, outermost first."""
    end = bisect.bisect_right(starts, ts)
    window = thread_ops[bisect.bisect_left(starts, ts - LONG_US):end]
    chain = [e for e in window + long_ops if e["ts"] <= ts <= e["ts"] + e["dur"]]
    return sorted({id(e): e for e in chain}.values(), key=lambda e: (e["ts"], -e["dur"]))


def gaps(kernels, min_us):
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        if k["ts"] - end > min_us:
            yield end, k["ts"], k
        end = max(end, k["ts"] + k["dur"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--min-us", type=float, default=50.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.traces:
        kernels, launches, ops = load(path)
        starts = {tid: [e["ts"] for e in thread_ops] for tid, thread_ops in ops.items()}
        long_ops = {tid: [e for e in thread_ops if e["dur"] > LONG_US] for tid, thread_ops in ops.items()}
        by_inner, by_chain, by_launcher = collections.Counter(), collections.Counter(), collections.Counter()
        total, count = 0.0, 0
        for start, stop, kernel in gaps(kernels, args.min_us):
            idle = stop - start
            total, count = total + idle, count + 1
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            if launch is None:
                by_inner["(launch not in trace)"] += idle
                continue
            tid = launch["tid"]
            chain = enclosing(ops.get(tid, []), starts.get(tid, []), long_ops.get(tid, []), (start + stop) / 2)
            names = [e["name"][:50] for e in chain]
            by_inner[names[-1] if names else "(no op: between ops)"] += idle
            by_chain[" > ".join(names[-3:]) if names else "(no op)"] += idle
            launcher = enclosing(ops.get(tid, []), starts.get(tid, []), long_ops.get(tid, []), launch["ts"])
            by_launcher[launcher[-1]["name"][:50] if launcher else launch["name"]] += idle
        print(f"{path}\n  {count} gaps over {args.min_us:.0f} us, {total / 1e3:.1f} ms idle")
        for title, counter in (("innermost host op at the gap's midpoint", by_inner),
                               ("last three enclosing ops at the midpoint", by_chain),
                               ("host op that launched the kernel ending the gap", by_launcher)):
            print(f"  by {title}:")
            for name, us in counter.most_common(args.top):
                print(f"    {us / 1e3:8.2f} ms  {name}")


if __name__ == "__main__":
    main()
