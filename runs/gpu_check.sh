#!/usr/bin/env bash
# Everything only a GPU can show, in one run of <= 8 minutes on one H100/H200 with no network: the CUDA-marked
# tests; training tok/s and MFU (d12 and d20 bf16 compiled, d20 fp8); decode tok/s and MBU at batch 1/8/32; a
# 200-step d12 run on the offline corpus whose loss must fall; chat_web under 32 concurrent streaming clients.
# One JSON line per step goes to the results file; logs, data and checkpoints to $NANOCHAT_BASE_DIR/gpu_check.
#
#   bash runs/gpu_check.sh                                   # on the GPU box
#   bash runs/gpu_check.sh --results /tmp/h200.jsonl         # elsewhere than ./gpu_check_results.jsonl
#   bash runs/gpu_check.sh --dry-run                         # any machine: each step at toy size on the CPU (CI)
#
# The steps, their sizes and their pass/fail checks are in dev/gpu_check.py (python -m dev.gpu_check --help).
source "$(dirname "$0")/common.sh"
exec "$PY" -m dev.gpu_check "$@"
