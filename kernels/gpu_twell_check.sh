#!/usr/bin/env bash
# One device call: GPU tests of the TwELL kernels, then the inference benchmark (sweep of launch
# configs first). Logs and JSON go to $OUT (or ./twell_out). Usage: bash kernels/gpu_twell_check.sh [bench args]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/twell_out}; mkdir -p "$OUT"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy_cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
timeout "$TEST_TIMEOUT" python -m pytest -m gpu tests/gpu/test_twell.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest rc=${PIPESTATUS[0]}"
timeout "$BENCH_TIMEOUT" python -m sparse_llm.kernels.bench inference --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^W1\|^  warnings"
echo "bench rc=${PIPESTATUS[0]}"
