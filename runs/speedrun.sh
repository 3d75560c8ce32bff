#!/usr/bin/env bash
# The reference recipe on one 8xGPU node (8xH100: ~2 h of d24 pretraining, ~3 h in all): data, tokenizer, a d24
# base model at tokens:params 8 with fp8, its evaluation (CORE, bpb, samples), SFT, the chat evaluation and the
# report card. Run it inside screen/tmux and keep the log:
#
#   bash runs/speedrun.sh 2>&1 | tee speedrun.log
#   WANDB_RUN=speedrun PUSH_TO=s3://bucket/speedrun bash runs/speedrun.sh     # wandb, checkpoints off the box
#   bash runs/speedrun.sh --tiny        # (or TINY=1) every stage at toy size on the CPU, offline (what CI runs)
#
# Environment: see runs/common.sh (NANOCHAT_BASE_DIR, WANDB_RUN, NPROC_PER_NODE, PUSH_TO, DATA_DIR).
# The identity conversations are the persona shipped in nanochat/data/ unless
# $NANOCHAT_BASE_DIR/identity_conversations.jsonl exists. Then chat with it:
#   python -m scripts.chat_cli -p "Why is the sky blue?"      or      python -m scripts.chat_web
source "$(dirname "$0")/common.sh"

stage "report reset" "$PY" -m nanochat.report reset

if [ "$TINY" = 1 ]; then
    DATA=$(tiny_data_flags)
    stage "tokenizer" "$PY" -m scripts.tok_train --vocab-size=512 --max-chars=2000000 $DATA
    stage "tokenizer eval" "$PY" -m scripts.tok_eval
    stage "base model (d2)" launch scripts.base_train --depth=2 --aspect-ratio=32 --head-dim=32 --window-pattern=L \
        --max-seq-len=64 --device-batch-size=4 --total-batch-size=256 --num-iterations=20 --warmup-steps=5 \
        --eval-every=10 --eval-tokens=1024 --core-metric-every=-1 --sample-every=-1 --compile=0 $DATA \
        --run="$WANDB_RUN" "${PUSH_FLAGS[@]}"
    EVALS=bpb,sample
    if have_eval_bundle; then EVALS=core,bpb,sample; fi
    stage "base eval" launch scripts.base_eval --eval=$EVALS --device-batch-size=4 --split-tokens=1024 \
        --max-per-task=4 $DATA
    stage "SFT" launch scripts.chat_sft --offline --offline-size=200 --max-seq-len=64 --device-batch-size=4 \
        --total-batch-size=256 --num-iterations=10 --eval-every=10 --eval-tokens=1024 --chatcore-every=-1 \
        --run="$WANDB_RUN" "${PUSH_FLAGS[@]}"
    stage "chat eval" launch scripts.chat_eval -i sft -a "SpellingBee|Arithmetic" -x 4 -m 16
else
    # ~2B characters for the tokenizer; then the ~150 shards d24 needs (+20 spare) download during its training
    stage "data (8 shards)" "$PY" -m nanochat.dataset -n 8
    "$PY" -m nanochat.dataset -n 170 &
    DATASET_DOWNLOAD_PID=$!
    stage "tokenizer" "$PY" -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    stage "tokenizer eval" "$PY" -m scripts.tok_eval
    echo "Waiting for the dataset download to finish..."
    wait $DATASET_DOWNLOAD_PID
    stage "base model (d24)" launch scripts.base_train --depth=24 --target-param-data-ratio=8 \
        --device-batch-size=16 --fp8 --run="$WANDB_RUN" "${PUSH_FLAGS[@]}"
    stage "base eval" launch scripts.base_eval --device-batch-size=16
    stage "SFT" launch scripts.chat_sft --device-batch-size=16 --run="$WANDB_RUN" "${PUSH_FLAGS[@]}"
    stage "chat eval" launch scripts.chat_eval -i sft
fi

stage "report" "$PY" -m nanochat.report generate
stage_summary
