#!/usr/bin/env bash
# The whole pipeline on a CPU (or a Mac), small enough to finish in ~15 minutes on 2 cores, with no downloads:
#   offline corpus (Python's own docs and sources) -> tokenizer -> tiny base model -> SFT on an offline mixture
#   (persona, spelling/letter counting, arithmetic with a calculator) -> evals -> report.md
# It is a demo of every stage, not a useful model: expect it to know its name, follow the chat format, and count
# letters / do arithmetic through its tools better than the base model did.
#
#   bash runs/runcpu.sh                       # offline (default)
#   NANOCHAT_DATA=hub bash runs/runcpu.sh     # with internet: ClimbMix text + the reference SFT mixture
#
# Knobs (environment): NANOCHAT_BASE_DIR (default ~/.cache/nanochat), NANOCHAT_DATA (offline|hub),
# OMP_NUM_THREADS (default: all cores), WANDB_RUN (default dummy = no wandb),
# BASE_STEPS / SFT_STEPS (training steps), EVAL_PROBLEMS (problems per chat eval task).
# Once set up (the .venv exists), it runs with no network at all.

set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NANOCHAT_DATA="${NANOCHAT_DATA:-offline}"
WANDB_RUN="${WANDB_RUN:-dummy}"
BASE_STEPS="${BASE_STEPS:-65}"
SFT_STEPS="${SFT_STEPS:-100}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-25}"
# one intra-op thread per core; more threads than cores only adds contention
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(python3 -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')}"
case "$NANOCHAT_DATA" in offline|hub) ;; *) echo "NANOCHAT_DATA must be offline or hub, got '$NANOCHAT_DATA'" >&2; exit 1 ;; esac

# -----------------------------------------------------------------------------
# Setup: a .venv with torch (kept if already importable: on a GPU box install your CUDA torch first) and nanochat
if [ ! -x .venv/bin/python ]; then
    echo "[runcpu] creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c "import torch" 2>/dev/null; then
    echo "[runcpu] installing torch (CPU)"
    $PY -m pip install -q torch==2.13.0
fi
# a .venv from an older checkout may lack newer dependencies: reinstall unless every one of them imports
if ! $PY -c "import nanochat.report, tiktoken, rustbpe, pyarrow, matplotlib, psutil, filelock, requests, tqdm, regex, yaml, jinja2, bm25s, Stemmer, safetensors, tokenizers, huggingface_hub, fsspec, fastapi, uvicorn, pydantic" 2>/dev/null; then
    echo "[runcpu] installing nanochat (pip install -e .)"
    $PY -m pip install -q -e .
fi

source runs/common.sh  # stage / stage_summary, shared with the other recipes

echo "[runcpu] NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR NANOCHAT_DATA=$NANOCHAT_DATA OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "[runcpu] load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"

stage "report reset" $PY -m nanochat.report reset

# -----------------------------------------------------------------------------
# Data and tokenizer
if [ "$NANOCHAT_DATA" = "hub" ]; then
    stage "download climbmix" $PY -m nanochat.dataset -n 2   # ~250M chars each, plus the val shard
    SFT_DATA=""             # the reference SFT mixture from the hub
else
    stage "offline corpus" $PY -m nanochat.dataset --offline  # ~32M chars of stdlib docs/sources, kept if present
    SFT_DATA="--offline"
fi
# --force: a re-run retrains every stage after this one too, so replacing the tokenizer is intended here
stage "tokenizer training" $PY -m scripts.tok_train --vocab-size=8192 --max-chars=20000000 --force
stage "tokenizer eval" $PY -m scripts.tok_eval

# -----------------------------------------------------------------------------
# Base model: 4 layers, 256 wide, 512-token context, 8K tokens per step. base_train scales LRs by
# sqrt(batch / 524288) = 1/8 here; a run this short wants them 4x the defaults (effective 0.01 for Muon), except the
# scalars' (--scalar-lr), which do better left at the default (dev/LEARNING.md)
stage "base training" $PY -m scripts.base_train \
    --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 \
    --device-batch-size=16 --total-batch-size=8192 --num-iterations="$BASE_STEPS" --warmup-steps=10 \
    --matrix-lr=0.08 --embedding-lr=1.2 --unembedding-lr=0.032 \
    --eval-every=50 --eval-tokens=32768 --core-metric-every=-1 --sample-every=-1 --run="$WANDB_RUN"
stage "base eval" $PY -m scripts.base_eval --eval=bpb,sample --device-batch-size=16 --split-tokens=32768

# -----------------------------------------------------------------------------
# SFT, then compare base and SFT on letter counting and arithmetic (both answer through the calculator tool)
stage "SFT" $PY -m scripts.chat_sft $SFT_DATA \
    --max-seq-len=512 --device-batch-size=8 --total-batch-size=4096 --num-iterations="$SFT_STEPS" \
    --matrix-lr=0.02 --embedding-lr=0.3 --unembedding-lr=0.008 --identity-epochs=6 --eval-every=100 --eval-tokens=32768 --chatcore-every=-1 --run="$WANDB_RUN"
stage "chat eval base" $PY -m scripts.chat_eval -i base -a "SpellingBee|Arithmetic" -x "$EVAL_PROBLEMS" -m 200
stage "chat eval sft" $PY -m scripts.chat_eval -i sft -a "SpellingBee|Arithmetic" -x "$EVAL_PROBLEMS" -m 200

stage "report generate" $PY -m nanochat.report generate
echo
echo "=== [runcpu] the SFT model, asked two questions (greedy; letter counting is in report.md) ==="
for question in "What is your name?" "What is 123 + 456?"; do
    echo "User: $question"
    $PY -m scripts.chat_cli -t 0 -p "$question"
done

stage_summary
echo
echo "Report: report.md (and $NANOCHAT_BASE_DIR/report/report.md)"
echo "Chat with it:"
echo "    $PY -m scripts.chat_cli -p \"What is your name?\""
echo "    $PY -m scripts.chat_cli          # interactive"
