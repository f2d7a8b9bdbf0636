"""Host time of one hybrid FFN fwd+bwd against its device time: is the benchmark waiting on Python?
Times a few back-to-back calls enqueued behind a sleeping GPU (the host's own cost), the calls'
wall time with the device (events), and prints the cProfile of the host path, heaviest first.

    PYTHONPATH=$PWD python kernels/experiments/host_overhead.py [mean_active=29]
"""
import cProfile
import pstats
import sys
import time

import torch

from sparse_llm.kernels.hybrid import hybrid_ffn
from sparse_llm.kernels.synthetic import make_synthetic_ffn

mean_active = float(sys.argv[1]) if len(sys.argv) > 1 else 29.0
s = make_synthetic_ffn(16384, 2048, 5632, mean_active, seed=0)
leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
dy = torch.randn_like(s.x)
dl1 = torch.tensor(1e-3, device="cuda")


def step():
    y, l1, _, _ = hybrid_ffn(*leaves)
    return torch.autograd.grad([y, l1], leaves, [dy, dl1])


for _ in range(5):
    step()
torch.cuda.synchronize()
# host time behind a sleeping GPU, few enough calls that the launch queue never fills (a full queue
# makes the host wait on the device: a 50-call loop once read 3.2 ms where the host needed ~2.4)
n = 8
for _ in range(3):
    torch.cuda._sleep(200_000_000)
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    print(f"host enqueue behind a sleeping GPU: {host * 1e3:.3f} ms per fwd+bwd")
start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start_event.record()
for _ in range(n):
    step()
end_event.record()
end_event.synchronize()
print(f"wall with device {start_event.elapsed_time(end_event) / n:.3f} ms per fwd+bwd")
# the profile too behind a sleeping GPU: with a full queue, the launches' waits would show as host time
torch.cuda._sleep(400_000_000)
profiler = cProfile.Profile()
profiler.enable()
for _ in range(n):
    step()
profiler.disable()
torch.cuda.synchronize()
pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
