#!/usr/bin/env bash
# Post-training on the CPU demo's models: run it after runs/runcpu.sh, on the same NANOCHAT_BASE_DIR (offline,
# a few minutes on 2 cores):
#   1. filter the demo's SFT data (its persona conversations) with the SFT-pool filter -> the drop table
#   2. preference pairs: the kept conversations' answers (chosen) vs the SFT model's own samples (rejected),
#      then DPO from the SFT model, validated on held-out pairs before and after
#   3. RL on Arithmetic (calculator calls) from the SFT model: held-out pass@k before and after, then chat_eval
#   4. the report sections (SFT data filter, DPO pairs, Chat DPO, Chat RL, Chat evaluation rl/dpo), report.md
#
#   bash runs/runcpu.sh && bash runs/posttrain_cpu.sh
#
# Knobs (environment): NANOCHAT_BASE_DIR (default ~/.cache/nanochat), OMP_NUM_THREADS (default 1),
# WANDB_RUN (default dummy), DPO_STEPS, RL_STEPS (training steps), EVAL_PROBLEMS (problems per chat eval task).

set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
WANDB_RUN="${WANDB_RUN:-dummy}"
DPO_STEPS="${DPO_STEPS:-20}"
RL_STEPS="${RL_STEPS:-30}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-25}"
# one thread: these stages sample one token at a time and train on small batches, which a second thread barely
# speeds up and a busy machine slows down several times (dev/PERF.md, "Busy machines", "Post-training")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    echo "[posttrain] no .venv here: run runs/runcpu.sh first" >&2
    exit 1
fi
if ! ls "$NANOCHAT_BASE_DIR"/chatsft_checkpoints/*/meta_*.json >/dev/null 2>&1; then
    echo "[posttrain] no SFT model in $NANOCHAT_BASE_DIR/chatsft_checkpoints: run runs/runcpu.sh first (same NANOCHAT_BASE_DIR)" >&2
    exit 1
fi
WORK="$NANOCHAT_BASE_DIR/posttrain"
mkdir -p "$WORK"
# the persona conversations chat_sft trained on: the user's own file if there is one, else the shipped one
IDENTITY="$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
[ -f "$IDENTITY" ] || IDENTITY=nanochat/data/identity_conversations.jsonl

source runs/common.sh  # stage / stage_summary, shared with the other recipes

echo "[posttrain] NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "[posttrain] load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"

# -----------------------------------------------------------------------------
# 1. The SFT-pool filter on the demo's persona conversations
stage "filter SFT data" $PY -m scripts.filter_sft "$IDENTITY" \
    --output "$WORK/identity_kept.jsonl" --rejected "$WORK/identity_dropped.jsonl"

# -----------------------------------------------------------------------------
# 2. DPO: 48 training prompts, 16 held out; rejected = what the SFT model answers now
stage "DPO pairs (train)" $PY -m scripts.make_dpo_pairs -i sft --input "$WORK/identity_kept.jsonl" \
    --limit 48 --max-new-tokens 96 --output "$WORK/dpo_train.jsonl"
stage "DPO pairs (val)" $PY -m scripts.make_dpo_pairs -i sft --input "$WORK/identity_kept.jsonl" \
    --offset 48 --limit 16 --max-new-tokens 96 --seed 1000 --output "$WORK/dpo_val.jsonl"
stage "DPO" $PY -m scripts.chat_dpo --source sft --train-jsonl "$WORK/dpo_train.jsonl" --val-jsonl "$WORK/dpo_val.jsonl" \
    --num-iterations "$DPO_STEPS" --eval-every 10 --run "$WANDB_RUN"

# -----------------------------------------------------------------------------
# 3. RL on Arithmetic from the SFT model (held-out pass@k at the start and the end), then the same chat eval
#    runcpu.sh ran on the SFT model, on the RL and DPO models
stage "RL (Arithmetic)" $PY -m scripts.chat_rl --source sft --task Arithmetic --num-iterations "$RL_STEPS" \
    --examples-per-step 4 --num-samples 8 --device-batch-size 8 --max-new-tokens 64 \
    --eval-every "$RL_STEPS" --eval-examples 48 --eval-samples 4 --save-every -1 --run "$WANDB_RUN"
# -s: this run's checkpoints, not a higher step an earlier, longer run left there
stage "chat eval rl" $PY -m scripts.chat_eval -i rl -s "$RL_STEPS" -a "SpellingBee|Arithmetic" -x "$EVAL_PROBLEMS" -m 200
stage "chat eval dpo" $PY -m scripts.chat_eval -i dpo -s "$DPO_STEPS" -a "SpellingBee|Arithmetic" -x "$EVAL_PROBLEMS" -m 200

stage "report generate" $PY -m nanochat.report generate

stage_summary
echo
echo "Report: report.md (and $NANOCHAT_BASE_DIR/report/report.md)"
echo "Chat with them:"
echo "    $PY -m scripts.chat_cli -i rl -p \"What is 123 + 456?\""
echo "    $PY -m scripts.chat_cli -i dpo -p \"What is your name?\""
