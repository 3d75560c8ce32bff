#!/usr/bin/env bash
# After runs/runcpu.sh: teach its tiny SFT model the think -> tool call -> answer format, offline, and measure it
# with the probe suite. Separate from runcpu.sh because it does not fit that script's 15-minute budget.
#   generated data (scripts/gen_think_tool_data: search over the fictional demo documents, calculator, dates,
#   travel, direct answers, pronoun follow-ups) -> SFT from runcpu's SFT checkpoint into chatsft_checkpoints/think
#   -> probes in think mode with tools, before and after (format compliance: think closed before the answer,
#   tool calls well-formed, web_search called when the question needs it).
#
#   bash runs/runcpu.sh && bash runs/think_tools_cpu.sh
#
# Knobs (environment): NANOCHAT_BASE_DIR (the one runcpu.sh used), THINK_STEPS (SFT steps), THINK_ROWS (training
# conversations), PROBE_TOKENS (tokens per probe answer), OMP_NUM_THREADS, WANDB_RUN. No network is used.

set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
WANDB_RUN="${WANDB_RUN:-dummy}"
THINK_STEPS="${THINK_STEPS:-150}"
THINK_ROWS="${THINK_ROWS:-3000}"
PROBE_TOKENS="${PROBE_TOKENS:-400}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(python3 -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')}"
PY="${PY:-.venv/bin/python}"
DATA="$NANOCHAT_BASE_DIR/think_tool_data"
LOG="$NANOCHAT_BASE_DIR/probe_results.jsonl"

if ! ls "$NANOCHAT_BASE_DIR"/chatsft_checkpoints/d*/model_*.pt >/dev/null 2>&1; then
    echo "No SFT checkpoint under $NANOCHAT_BASE_DIR/chatsft_checkpoints: run 'bash runs/runcpu.sh' first." >&2
    exit 2
fi
SOURCE_TAG=$(basename "$(dirname "$(ls -t "$NANOCHAT_BASE_DIR"/chatsft_checkpoints/d*/model_*.pt | head -1)")")

source runs/common.sh  # stage / stage_summary, shared with the other recipes
probes() {  # probes TAG: the whole suite in think mode with calculator, python and web_search (offline)
    $PY -m scripts.chat_probe -i sft -g "$1" --think on --with-tools --max-new-tokens "$PROBE_TOKENS" \
        --min-pass 0 --log "$LOG"
}

echo "[think_tools] NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR from chatsft_checkpoints/$SOURCE_TAG, OMP_NUM_THREADS=$OMP_NUM_THREADS"

# the model is 512 tokens wide: --max-seq-len sizes the search outputs as the Engine will for it
stage "think/tool data" $PY -m scripts.gen_think_tool_data --output "$DATA/train.jsonl" --rows "$THINK_ROWS" \
    --seed 0 --max-seq-len 512
$PY -m scripts.gen_think_tool_data --output "$DATA/val.jsonl" --rows 200 --seed 1 --max-seq-len 512
stage "probes before (SFT model)" probes "$SOURCE_TAG"
stage "think/tool SFT" $PY -m scripts.chat_sft --source sft --model-tag "$SOURCE_TAG" --output-tag think \
    --custom-only --extra-train-jsonl "$DATA/train.jsonl" --extra-val-jsonl "$DATA/val.jsonl" --think-default on \
    --max-seq-len=512 --device-batch-size=8 --total-batch-size=4096 --num-iterations="$THINK_STEPS" \
    --matrix-lr=0.02 --embedding-lr=0.3 --unembedding-lr=0.008 --eval-every=-1 --eval-tokens=32768 \
    --chatcore-every=-1 --run="$WANDB_RUN"
stage "probes after (think model)" probes think

echo
echo "=== [think_tools] format compliance, before -> after ==="
$PY - "$LOG" <<'EOF'
import json, sys
before, after = [json.loads(line) for line in open(sys.argv[1])][-2:]
def rate(record, name):
    c = record["format_compliance"][name]
    return "n/a" if c["rate"] is None else f"{c['passed']}/{c['total']} ({c['rate']:.0%})"
for name in after["format_compliance"]:
    print(f"  {name:<28} {rate(before, name):>14} -> {rate(after, name)}")
print(f"  {'probe pass rate':<28} {before['total']:>14.0%} -> {after['total']:.0%}")
for category in sorted(after["per_category"]):
    print(f"    {category:<26} {before['per_category'].get(category, 0):>14.0%} -> {after['per_category'][category]:.0%}")
EOF

stage_summary
echo
echo "Chat with it (think on by default; /think switches it):"
echo "    $PY -m scripts.chat_cli -g think --tools calculator,web_search --search-docs nanochat/data/search_docs"
