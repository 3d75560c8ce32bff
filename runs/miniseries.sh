#!/usr/bin/env bash
# A miniseries: base models of increasing depth, each trained compute-optimally (the default tokens:params
# ratio), one CSV row each (depth, parameter counts, FLOPs per token and in total, tokens, val bpb, CORE, training
# time: read from the checkpoint, see nanochat/series.py) and a plot of val bpb and CORE against training FLOPs.
# Depths already in the CSV are skipped, so a stopped series resumes.
#
#   bash runs/miniseries.sh [series_name]          # default name: today's date, e.g. jan30
#   DEPTHS="12 16 20" bash runs/miniseries.sh mine
#   bash runs/miniseries.sh --tiny                 # (or TINY=1) d2 and d3 at toy size on the CPU (what CI runs)
#
# Results: $NANOCHAT_BASE_DIR/<series>_miniseries_results/{results.csv,results.png}. Environment: runs/common.sh.
source "$(dirname "$0")/common.sh"

SERIES="${ARGS[0]:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
results_dir "$NANOCHAT_BASE_DIR/${SERIES}_miniseries_results"

if [ "$TINY" = 1 ]; then
    DEPTHS=(${DEPTHS:-2 3})
    DATA=$(tiny_data_flags)
    stage "tokenizer" ensure_tokenizer --vocab-size=512 --max-chars=2000000 $DATA
    CORE_FLAGS=(--core-metric-every=-1)
    if have_eval_bundle; then CORE_FLAGS=(--core-metric-every=999999 --core-metric-max-per-task=4); fi
    # tokens:params 0.02 keeps each run to tens of steps; --eval-every 999999 = at the first and last step only
    TRAIN_FLAGS=(--aspect-ratio=32 --head-dim=32 --window-pattern=L --max-seq-len=64 --device-batch-size=4
                 --total-batch-size=256 --target-param-data-ratio=0.02 --warmup-steps=2 --eval-every=999999
                 --eval-tokens=1024 --compile=0 $DATA "${CORE_FLAGS[@]}")
else
    DEPTHS=(${DEPTHS:-12 14 16 18 20 22 24 26})
    # d26 at the default ratio reads ~11B tokens: ~210 shards of ~250M characters, plus spare
    stage "data" "$PY" -m nanochat.dataset -n 240
    stage "tokenizer" ensure_tokenizer --max-chars=2000000000 --vocab-size=32768
    TRAIN_FLAGS=(--core-metric-every=999999 --core-metric-max-per-task=-1)
fi

for depth in "${DEPTHS[@]}"; do
    tag="${SERIES}_d${depth}"
    if "$PY" -m nanochat.series has "$CSV" depth="$depth"; then
        echo "d$depth is already in $CSV: skipping"
        continue
    fi
    batch=32  # sequences per GPU that fit 80 GB at 2048 tokens
    if [ "$depth" -ge 20 ]; then batch=16; fi
    if [ "$depth" -ge 28 ]; then batch=8; fi
    if [ "$TINY" = 1 ]; then batch=4; fi
    run="dummy"
    if [ "$WANDB_RUN" != dummy ]; then run="${WANDB_RUN}_d${depth}"; fi
    stage "d$depth" launch scripts.base_train --depth="$depth" --device-batch-size="$batch" --model-tag="$tag" \
        --sample-every=-1 --save-every=-1 --run="$run" "${TRAIN_FLAGS[@]}" "${PUSH_FLAGS[@]}"
    "$PY" -m nanochat.series append "$CSV" --model-tag "$tag"
done

stage "plot" "$PY" -m nanochat.series plot "$CSV" --x total_flops --y val_bpb --y core_score \
    --out "$RESULTS_DIR/results.png"
column -s, -t < "$CSV" 2>/dev/null || cat "$CSV"
stage_summary
