"""Host side of one hybrid FFN fwd+bwd (16384 tokens, 2048 x 5632, 29 active): host enqueue time against
wall time with and without autograd, any synchronising call inside (torch.cuda.set_sync_debug_mode: none
was reported on 2026-11-24, H100) and the CPU-side profiler table. As it ran.

    PYTHONPATH=$PWD python kernels/experiments/host_sync_check.py
"""
import time, warnings, torch
from sparse_llm.kernels import hybrid
from sparse_llm.kernels.synthetic import make_synthetic_ffn
s = make_synthetic_ffn(16384, 2048, 5632, 29.0, seed=0)
leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
dy = torch.randn_like(s.x); dl1 = torch.tensor(1e-3, device="cuda")
def ours():
    y, l1, _, _ = hybrid.hybrid_ffn(*leaves)
    return torch.autograd.grad([y, l1], leaves, [dy, dl1])
def fwd_only():
    with torch.no_grad():
        return hybrid.hybrid_ffn(*leaves)
def host_ms(fn, n=30):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    h = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize(); w = (time.perf_counter() - t) / n * 1e3
    return f"host {h:.3f} ms, wall {w:.3f} ms"
print("ours:", host_ms(ours)); print("fwd no_grad:", host_ms(fwd_only))
torch.cuda.set_sync_debug_mode(1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours()
torch.cuda.set_sync_debug_mode(0)
for w in caught: print("SYNC:", str(w.message)[:150], w.filename, w.lineno)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10): ours()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
