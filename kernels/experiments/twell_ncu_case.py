"""One TwELL FFN at 131072 tokens, 2048x5632, for Nsight Compute (NOTES_twell.md v5, v7):
    ncu --clock-control none -k regex:'twell_(ffn_fused|gate_pack)' -c 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis python kernels/experiments/twell_ncu_case.py 29 [up_blocked]
"""
import sys
import torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
active = float(sys.argv[1])
twell.set_default_config(twell.FusedConfig(up_blocked=int(sys.argv[2]) if len(sys.argv) > 2 else 0))
s = make_synthetic_ffn(131072, 2048, 5632, active, 0.0, torch.bfloat16, "cuda", 0)
wdt = s.w_down.t().contiguous()
for _ in range(2):
    twell.twell_ffn(s.x, s.w_gate, s.w_up, None, w_down_t=wdt)
torch.cuda.synchronize()
print("done")
