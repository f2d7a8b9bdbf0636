"""Gate kernel of one token chunk on part of the GPU while the fused stage runs on the rest (two
streams), against the two in sequence (NOTES_twell.md v4). H100, 2048x5632, 131072 tokens.
    PYTHONPATH=$PWD python kernels/experiments/overlap.py
"""
import torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from triton.testing import do_bench
def bench(fn, rep=200): return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))
n = 131072
syn = make_synthetic_ffn(n, 2048, 5632, 29, 0.0, torch.bfloat16, "cuda", 0)
x, wg, wu = syn.x, syn.w_gate, syn.w_up
wdt = syn.w_down.t().contiguous()
rt = torch.zeros(n, dtype=torch.int32, device="cuda")
gate, counts, packed, stats = twell.twell_gate_pack(x, wg, 32, row_total=rt)
order = torch.argsort(rt, descending=True).to(torch.int32)
rt2 = torch.zeros(n, dtype=torch.int32, device="cuda")
D = twell.FusedConfig()
print("gate full", bench(lambda: twell.twell_gate_pack(x, wg, 32, row_total=rt2)))
print("fused full", bench(lambda: twell.twell_ffn_packed(x, gate, counts, packed, wu, wdt, order=order)))
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
for gsms, fill in [(66, 0.5), (88, 0.34), (100, 0.25), (44, 0.67)]:
    cg = twell.FusedConfig(gate_sms=gsms)
    cf = twell.FusedConfig(grid_fill=fill)
    tg = bench(lambda: twell.twell_gate_pack(x, wg, 32, row_total=rt2, config=cg))
    tf = bench(lambda: twell.twell_ffn_packed(x, gate, counts, packed, wu, wdt, order=order, config=cf))
    def both():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur); s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            twell.twell_gate_pack(x, wg, 32, row_total=rt2, config=cg)
        with torch.cuda.stream(s2):
            twell.twell_ffn_packed(x, gate, counts, packed, wu, wdt, order=order, config=cf)
        cur.wait_stream(s1); cur.wait_stream(s2)
    tb = bench(both)
    print(f"gate_sms {gsms}: gate {tg:.3f} | fused fill {fill}: {tf:.3f} | concurrent {tb:.3f} (sum {tg + tf:.3f})", flush=True)
