#!/usr/bin/env bash
# The CUDA paths in one call: the tests marked `cuda`, train.py under torchrun (NCCL, one process) and
# bench.py at the bert-base shape in bf16 (absorbing and Gaussian, training and sampling: steps/s, tokens/s,
# MFU against the card's peak, peak memory). Prints one table; exits 1 if anything failed. At most about
# 8 minutes on one GPU (GPU_CHECK_BUDGET seconds, default 480). Without CUDA every CUDA row is skipped and
# the exit status is 0.
#
#   bash scripts/gpu_check.sh                 # logs and JSON in a fresh temporary folder
#   GPU_CHECK_OUT=DIR bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/launch.sh
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
exec "$PY" scripts/gpu_check.py --out "$OUT" --budget "${GPU_CHECK_BUDGET:-480}"
