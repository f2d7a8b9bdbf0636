#!/usr/bin/env bash
# Device check of the hybrid training kernels (run on the GPU machine from the repo root):
#   bash kernels/gpu_hybrid_check.sh [all|test|bench]
# GPU tests, then the training bench (per-kernel profile + crossover sweep); logs under $OUT.
# PYTEST_ARGS (default -x), BENCH_ARGS, SANITIZE=1 (memcheck a small case when the tests fail).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hybrid_out}
mkdir -p "$OUT"
MODE=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/gpu.txt"
if [[ $MODE == all || $MODE == test ]]; then
  start=$(date +%s)
  timeout 300 python -m pytest -m gpu tests/gpu/test_hybrid.py -q -p no:cacheprovider ${PYTEST_ARGS--x} 2>&1 | tee "$OUT/test.log"
  rc=$?
  echo "gpu tests rc=$rc in $(( $(date +%s) - start )) s"
  if [[ $rc -ne 0 && -n "$SANITIZE" ]]; then
    timeout 240 compute-sanitizer --tool memcheck --print-limit 20 python - <<'PY' 2>&1 | tail -60 | tee "$OUT/sanitize.log"
import torch
from sparse_llm.kernels.hybrid import hybrid_ffn
for d, gated, dt in ((256, True, torch.bfloat16), (256, False, torch.float16), (2048, True, torch.bfloat16)):
    n, f = 300, 512
    x = torch.randn(n, d, device="cuda", dtype=dt, requires_grad=True)
    ws = [(torch.randn(f, d, device="cuda", dtype=dt) / d**0.5 - (0.05 if i == 0 else 0)).requires_grad_() for i in range(2)]
    wd = (torch.randn(d, f, device="cuda", dtype=dt) / f**0.5).requires_grad_()
    wg, wu = (ws[0], ws[1]) if gated else (None, ws[0])
    y, l1, tc, nc = hybrid_ffn(x, wg, wu, wd, ell_width=4)
    torch.autograd.grad([y, l1], [t for t in (x, wg, wu, wd) if t is not None], [torch.randn_like(y), torch.tensor(0.1, device="cuda")])
    torch.cuda.synchronize()
    print("sanitize case done", d, gated, dt)
PY
  fi
fi
if [[ $MODE == all || $MODE == bench ]]; then
  timeout 420 python -m sparse_llm.kernels.bench training --profile --sweep 35,42,56 \
    --json "$OUT/bench.json" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
fi
if [[ $MODE == ncu ]]; then
  timeout 300 ncu --clock-control none -k regex:'hy_(forward|dw|dx)' -c 6 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    python kernels/hybrid_ncu_case.py 2>&1 | grep -v "^==PROF==" | tee "$OUT/ncu.log" | \
    grep -E "hy_|Duration|Throughput|Hit Rate|Achieved Occupancy|Stall|Warp Cycles|Issued|L2|DRAM" | head -120
fi
