#!/usr/bin/env bash
# Everything GPU-side in one call: build (NVRTC) and test the kernels, benchmark them against dense
# PyTorch, benchmark whole models, and run short real trainings. Logs go to $OUT (or ./gpu_out).
#   launch/gpu_check.sh [tests] [kernels] [models] [train] [ncu] [multi] [multi_bench]
# (default: the first four). TESTS narrows the pytest run (e.g. tests/gpu/test_kernel_cache_gpu.py);
# MODELS (default "0p5b 1b 1p5b 2b") picks the scales of the whole-model benchmark;
# multi runs the multi-GPU checks (loss parity 1 vs N GPUs, kill and resume, resume onto one GPU,
# reduced statistics) and multi_bench the whole-model benchmark of MULTI_MODELS (default 1b) on 1
# and N GPUs, N = GPUS (default: every visible GPU);
# INFERENCE_ARGS / TRAINING_ARGS add options to the kernel benchmarks (e.g. --sweep);
# ncu profiles the hybrid kernels with Nsight Compute (clocks left as they are).
# On the lent GPU machine, carry .whl (hydra, omegaconf, wandb wheels) and data/cache/default.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" WANDB_MODE=offline
# NVLink multicast stays off on the lent machines (it can take shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ -d .whl ]] && ! python3 -c "import hydra, wandb" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
sections=("$@")
[[ ${#sections[@]} == 0 ]] && sections=(tests kernels models train)
status=0
step() {  # step NAME COMMAND...: run, tee to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc == 0 ]] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
for section in "${sections[@]}"; do
  case $section in
    tests)   step gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -s ${TESTS:-} ;;
    kernels) step bench_inference python3 -m sparse_llm.kernels.bench inference --json "$OUT/bench_inference.json" \
               ${INFERENCE_ARGS:-}
             step bench_training python3 -m sparse_llm.kernels.bench training --profile --json "$OUT/bench_training.json" \
               ${TRAINING_ARGS:-}
             step rope_ab python3 kernels/experiments/rope_ab.py
             step loss_ab python3 kernels/experiments/loss_ab.py ;;
    ncu)     step ncu_hybrid ncu --clock-control none -k regex:'hy_(forward|dw|dx)' -c 6 --section SpeedOfLight \
               --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
               python3 kernels/hybrid_ncu_case.py ;;
    models)  step bench_models python3 -m sparse_llm.study.bench_model --models ${MODELS:-0p5b 1b 1p5b 2b} \
               --variants dense sparse_kernel --json "$OUT/bench_models.json"
             step bench_dense_1b_compiled python3 -m sparse_llm.study.bench_model --models 1b --variants dense \
               --steps 20 --warmup 8 parallel.compile=true ;;
    train)   runs=${RUNS_DIR:-/tmp/gpu_check_runs}  # checkpoints stay out of $OUT
             step train_small python3 train.py model=small max_steps=200 logging.interval=20 eval_interval=100 \
               sparsity.l1=1e-3 output_dir="$runs" run_name=small-l1 checkpoint.interval=100
             step plots python3 -m sparse_llm.plots "$runs/small-l1"
             tar -cf "$OUT/small_run.tar" -C "$runs/small-l1" metrics.jsonl plots ;;
    multi)   step multi_gpu python3 -m sparse_llm.study.multi_gpu --gpus "${GPUS:-$(nvidia-smi -L | wc -l)}" \
               --root "${RUNS_DIR:-/tmp/gpu_check_runs}/multi_gpu-$(date +%s)" --json "$OUT/multi_gpu.json" ;;
    multi_bench) step bench_models_multi python3 -m sparse_llm.study.bench_model --models ${MULTI_MODELS:-1b} \
               --variants dense sparse_kernel --gpus 1 "${GPUS:-$(nvidia-smi -L | wc -l)}" --json "$OUT/bench_models_multi.json" ;;
    *) echo "unknown section $section (tests, kernels, models, train, ncu, multi, multi_bench)"; status=1 ;;
  esac
done
exit $status
