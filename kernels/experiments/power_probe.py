"""Power draw, SM clock and clock-event reasons (nvidia-smi, every 250 ms) while cuBLAS's gate GEMM
and the TwELL gate kernel each run back to back for ~4 s at 131072 x 2048 x 5632 (NOTES_twell.md v6).

    PYTHONPATH=$PWD python kernels/experiments/power_probe.py
"""
import subprocess, time, torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
n = 131072
syn = make_synthetic_ffn(n, 2048, 5632, 29, 0.0, torch.bfloat16, "cuda", 0)
x, wg = syn.x, syn.w_gate
rt = torch.zeros(n, dtype=torch.int32, device="cuda")
def run(name, fn, seconds=4.0):
    fn(); torch.cuda.synchronize()
    mon = subprocess.Popen(["nvidia-smi", "--query-gpu=power.draw,clocks.sm,clocks_event_reasons.active",
                            "--format=csv,noheader,nounits", "-lms", "250"], stdout=subprocess.PIPE, text=True)
    t0 = time.time(); k = 0
    while time.time() - t0 < seconds:
        for _ in range(50): fn()
        torch.cuda.synchronize(); k += 50
    ms = (time.time() - t0) / k * 1e3
    mon.terminate(); out = mon.communicate()[0].split("\n")
    rows = [l.split(", ") for l in out if l.strip()][2:]
    p = [float(r[0]) for r in rows]; c = [float(r[1]) for r in rows]
    print(f"{name}: {ms:.3f} ms/call, power {min(p):.0f}-{max(p):.0f} W (mean {sum(p)/len(p):.0f}), "
          f"SM clock {min(c):.0f}-{max(c):.0f} MHz, reasons {sorted(set(r[2] for r in rows))}", flush=True)
    time.sleep(2)
run("cublas gate GEMM", lambda: torch.matmul(x, wg.t()))
run("gate kernel v5", lambda: twell.twell_gate_pack(x, wg, 32, row_total=rt))
run("cublas gate GEMM", lambda: torch.matmul(x, wg.t()))
