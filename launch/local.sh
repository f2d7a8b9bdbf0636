#!/usr/bin/env bash
# Train on this machine with every visible GPU (or one CPU process):
#   launch/local.sh model=1b sparsity.l1=1e-4
# NPROC overrides the process count (e.g. NPROC=2 for two CPU processes on gloo); LOG_DIR the
# folder of the per-rank logs (default logs/local).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if [[ "$NPROC" == 1 ]]; then
  exec python train.py "$@"
fi
# every rank's output also goes to its own file under $LOG_DIR/<run id>/
exec torchrun --standalone --nproc-per-node "$NPROC" --log-dir "${LOG_DIR:-logs/local}" --redirects 3 --tee 3 \
  train.py "$@"
