"""Same-run A/B of twell_gate.cu variants (NOTES_twell.md v4, v5): the gate + pack stage at 131072 x
2048 x 5632, 3 rounds in alternating order, against cuBLAS's GEMM alone.

    PYTHONPATH=$PWD python kernels/experiments/gate_variants.py FILE:STAGES:SMEM_BYTES ...

Each FILE is a variant source placed in kernels/cuda/ and loaded in place of twell_gate.cu, with its
dynamic shared memory (TG_SMEM_BYTES). The variants measured came from git history: v4 is
`git show 2feafe6:kernels/cuda/twell_gate.cu` (197696 bytes at 4 stages); its no-epilogue form
guards both `tg_pack_row<...>(d, row, ...)` calls with `if (n_rows < 0)`; the current kernel is
230464 bytes at 4 stages.
"""
import sys
import torch
import sparse_llm.kernels.loader as loader
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from triton.testing import do_bench

real = loader.get_kernel
cur = {"name": "twell_gate.cu", "smem": None}
def patched(name, function, device, **defines):
    return real(cur["name"] if name == "twell_gate.cu" else name, function, device, **defines)
loader.get_kernel = patched
real_smem = twell.gate_shared_bytes
twell.gate_shared_bytes = lambda stages: cur["smem"] or real_smem(stages)

n = 131072
syn = make_synthetic_ffn(n, 2048, 5632, 29, 0.0, torch.bfloat16, "cuda", 0)
x, wg = syn.x, syn.w_gate
rt = torch.zeros(n, dtype=torch.int32, device="cuda")
flop = 2 * n * 2048 * 5632
ref = None
variants = [v.split(":") for v in sys.argv[1:]]
res = {v[0]: [] for v in variants}
for rnd in range(3):
    t = float(do_bench(lambda: torch.matmul(x, wg.t()), warmup=25, rep=300, return_mode="median"))
    print(f"round {rnd} cublas {t:.3f} ms {flop / t / 1e9:.0f} TF/s", flush=True)
    for name, stages, smem in (variants if rnd % 2 == 0 else variants[::-1]):
        cur["name"], cur["smem"] = name, int(smem)
        twell._RESIDENT_CLUSTERS.clear()
        cfg = twell.FusedConfig(gate_stages=int(stages))
        try:
            g, c, p, s = twell.twell_gate_pack(x, wg, 32, config=cfg)
            if ref is None:
                ref = c.clone()
            ok = torch.equal(c, ref) if "v4" not in name else "n/a"
            t = float(do_bench(lambda: twell.twell_gate_pack(x, wg, 32, row_total=rt, config=cfg), warmup=25, rep=300, return_mode="median"))
            res[name].append(t)
            print(f"  {name} st{stages}: {t:.3f} ms {flop / t / 1e9:.0f} TF/s counts-equal {ok}", flush=True)
        except Exception as e:
            print(f"  {name}: FAILED {type(e).__name__} {str(e)[:300]}", flush=True)
for k, v in res.items():
    if v:
        print(f"{k}: median {sorted(v)[len(v) // 2]:.3f} ms", flush=True)
