#!/usr/bin/env bash
# Scaling laws: for each compute budget, base models of several depths trained on exactly that many FLOPs
# (--target-flops; the tokens:params ratio follows), one CSV row per run (flops_budget, depth, parameter counts by
# group, tokens, val bpb, CORE, training time; nanochat/series.py) and the isoFLOP curves (val bpb against
# parameters, one curve per budget): the minimum of each curve is the compute-optimal model size for that budget.
# Runs already in the CSV are skipped, so a stopped sweep resumes.
#
#   bash runs/scaling_laws.sh [label]              # default label: today's date
#   FLOPS_BUDGETS="1e18 1e19" DEPTHS="10 14 18" bash runs/scaling_laws.sh mine
#   bash runs/scaling_laws.sh --tiny               # (or TINY=1) 2 budgets x d2, d3 at toy size on the CPU (CI)
#
# Results: $NANOCHAT_BASE_DIR/scaling_laws_results_<label>/{results.csv,isoflops.png}. Environment: runs/common.sh.
source "$(dirname "$0")/common.sh"

LABEL="${ARGS[0]:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
results_dir "$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"

if [ "$TINY" = 1 ]; then
    FLOPS_BUDGETS=(${FLOPS_BUDGETS:-5e9 1e10})
    DEPTHS=(${DEPTHS:-2 3})
    DATA=$(tiny_data_flags)
    stage "tokenizer" ensure_tokenizer --vocab-size=512 --max-chars=2000000 $DATA
    TRAIN_FLAGS=(--aspect-ratio=32 --head-dim=32 --window-pattern=L --max-seq-len=64 --device-batch-size=4
                 --total-batch-size=256 --warmup-steps=2 --eval-every=999999 --eval-tokens=1024 --compile=0
                 --core-metric-every=-1 $DATA)
else
    FLOPS_BUDGETS=(${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19})
    DEPTHS=(${DEPTHS:-8 10 12 14 16 18 20})
    stage "data" "$PY" -m nanochat.dataset -n 240
    stage "tokenizer" ensure_tokenizer --max-chars=2000000000 --vocab-size=32768
    TRAIN_FLAGS=(--eval-tokens=$((100 * 524288)) --core-metric-every=999999 --core-metric-max-per-task=-1)
fi

for flops in "${FLOPS_BUDGETS[@]}"; do
    for depth in "${DEPTHS[@]}"; do
        if "$PY" -m nanochat.series has "$CSV" flops_budget="$flops" depth="$depth"; then
            echo "budget $flops d$depth is already in $CSV: skipping"
            continue
        fi
        tag="scaling_${LABEL}_${flops}_d${depth}"
        batch=32
        if [ "$depth" -ge 20 ]; then batch=16; fi
        if [ "$TINY" = 1 ]; then batch=4; fi
        stage "$flops d$depth" launch scripts.base_train --depth="$depth" --target-flops="$flops" \
            --target-param-data-ratio=-1 --device-batch-size="$batch" --model-tag="$tag" --sample-every=-1 \
            --save-every=-1 --run=dummy "${TRAIN_FLAGS[@]}" "${PUSH_FLAGS[@]}"
        "$PY" -m nanochat.series append "$CSV" --model-tag "$tag" --label flops_budget="$flops"
    done
done

stage "plot" "$PY" -m nanochat.series plot "$CSV" --x params_total --y val_bpb --group flops_budget \
    --out "$RESULTS_DIR/isoflops.png"
column -s, -t < "$CSV" 2>/dev/null || cat "$CSV"
stage_summary
