#!/usr/bin/env bash
# Train on this machine: `launch/local.sh [hydra overrides...]`.
# One process today; the FSDP2 path (several GPUs through torchrun) is not in this version yet.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python train.py "$@"
