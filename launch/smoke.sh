#!/usr/bin/env bash
# Check a node (or an allocation) before a long run: every rank does one all-reduce and one
# training step of the tiny model.   launch/smoke.sh [NPROC]   (under SLURM: srun launch/smoke.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec torchrun --standalone --nproc-per-node "$NPROC" -m sparse_llm.parallel.smoke
