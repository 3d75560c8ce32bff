# Shared by the recipes in runs/ (source it, don't run it): the Python to use (with this repo importable from any
# directory: report.md lands in the directory you ran the recipe from), the environment every stage reads,
# --tiny / TINY=1, and helpers to launch and time stages.
#
#   PY                 the interpreter (default: the repo's .venv/bin/python if there, else python3)
#   NANOCHAT_BASE_DIR  where data, tokenizer, checkpoints and the report go (default ~/.cache/nanochat)
#   WANDB_RUN          wandb run name; dummy = no wandb (default)
#   NPROC_PER_NODE     GPUs for torchrun (default: all visible, else 1 = no torchrun)
#   TINY=1 / --tiny    toy sizes on the CPU, offline, end to end in seconds to a minute (what CI runs)
#   DATA_DIR           tiny mode: a folder of .jsonl/.parquet/.txt text to use instead of the offline corpus
#   PUSH_TO            also upload every checkpoint there while training (nanochat.hub: s3://, gs://, hf://...)

set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${PY:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --tiny anywhere on the command line (or TINY=1); the other arguments stay in ARGS
TINY="${TINY:-0}"
ARGS=()
for arg in "$@"; do
    case "$arg" in --tiny) TINY=1 ;; *) ARGS+=("$arg") ;; esac
done
if [ "$TINY" = 1 ]; then
    NPROC_PER_NODE=1
    export HF_HUB_OFFLINE=1
fi
PUSH_FLAGS=()
if [ -n "${PUSH_TO:-}" ]; then PUSH_FLAGS=(--push-to "$PUSH_TO"); fi

# launch MODULE ARGS...: torchrun over NPROC_PER_NODE GPUs, or one plain process
launch() {
    local module="$1"; shift
    if [ -z "${NPROC_PER_NODE:-}" ]; then  # counted on first use (importing torch takes seconds)
        NPROC_PER_NODE=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
    fi
    if [ "$NPROC_PER_NODE" -gt 1 ]; then
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" -m "$module" -- "$@"
    else
        "$PY" -m "$module" "$@"
    fi
}

# stage NAME COMMAND...: run it with a header, record how long it took (stage_summary prints the table)
STAGE_LOG=""
RUN_START=$(date +%s)
stage() {
    local name="$1"; shift
    echo
    echo "=== [$(basename "$0" .sh)] $name ==="
    local t0; t0=$(date +%s)
    "$@"
    local dt=$(( $(date +%s) - t0 ))
    STAGE_LOG+=$(printf '%-32s %6ds' "$name" "$dt")$'\n'
    echo "=== [$(basename "$0" .sh)] $name: ${dt}s ==="
}

stage_summary() {
    echo
    echo "=== [$(basename "$0" .sh)] stage times ==="
    printf '%s' "$STAGE_LOG"
    printf '%-32s %6ds\n' "total" "$(( $(date +%s) - RUN_START ))"
}

# results_dir DIR: the sweep's output folder (created) as RESULTS_DIR, and its CSV as CSV
results_dir() {
    RESULTS_DIR="$1"
    CSV="$RESULTS_DIR/results.csv"
    mkdir -p "$RESULTS_DIR"
}

# pretraining text for tiny mode: DATA_DIR if given, else the offline corpus (built once, no network)
tiny_data_flags() {
    if [ -n "${DATA_DIR:-}" ]; then
        echo "--data-dir=$DATA_DIR"
    else
        "$PY" -m nanochat.dataset --offline >&2
    fi
}

# train the tokenizer unless one is there (a sweep reuses it; delete $NANOCHAT_BASE_DIR/tokenizer to retrain)
ensure_tokenizer() {
    if [ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
        echo "tokenizer: keeping $NANOCHAT_BASE_DIR/tokenizer (delete it to retrain)"
    else
        "$PY" -m scripts.tok_train "$@"
    fi
}

# whether the CORE eval bundle is there (tiny mode never downloads it: CORE is then left empty)
have_eval_bundle() {
    [ -f "$NANOCHAT_BASE_DIR/eval_bundle/core.yaml" ]
}
