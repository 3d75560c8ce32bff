"""
Saving and loading checkpoints, in nanochat's layout so checkpoints move freely between the two:

    $NANOCHAT_BASE_DIR/<phase>_checkpoints/<model_tag>/
        model_<step:06d>.pt          state_dict of the uncompiled model (rank 0)
        optim_<step:06d>_rank<r>.pt  each rank's optimizer shard
        meta_<step:06d>.json         model_config, user_config, loop/dataloader state ...

Saves are atomic: every file is written to a temp file in the same directory, fsynced and renamed into
place, and the meta file is written last. A checkpoint "exists" only once its meta file is there, so a crash
(or a kill) in the middle of a save leaves the previous good checkpoint as the latest loadable one.
"""

import os
import re
import json
import glob
import logging
from dataclasses import fields

import torch
import torch.distributed as dist

from nanochat.common import get_base_dir, is_rank0
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.fileio import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

# source name (what users type) -> directory under the base dir
CHECKPOINT_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
    "dpo": "chatdpo_checkpoints",
}


def log0(message):
    if is_rank0():
        logger.info(message)


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


# -----------------------------------------------------------------------------
# Atomic file writes (nanochat.fileio): a crash mid-save never leaves a half-written file in place

def atomic_torch_save(obj, path):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_json_save(obj, path):
    # allow_nan: nanochat writes min_val_bpb = Infinity before the first eval; keep that format.
    atomic_write_text(path, json.dumps(obj, indent=2))


# -----------------------------------------------------------------------------
# Save / load raw checkpoint data

# The GPTConfig fields nanochat itself knows; it builds GPTConfig(**model_config) and rejects anything else.
NANOCHAT_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def nanochat_readable_meta(meta_data):
    """Drop our extra model_config fields while they hold their defaults (then nanochat can load the checkpoint
    and we lose nothing: a missing field reads back as its default). Non-default values are kept."""
    config = meta_data.get("model_config") if isinstance(meta_data, dict) else None
    if not isinstance(config, dict):
        return meta_data
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    kept = {k: v for k, v in config.items()
            if k in NANOCHAT_CONFIG_FIELDS or k not in defaults or v != defaults[k]}
    return {**meta_data, "model_config": kept}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Every rank calls this (each saves its own optimizer shard); rank 0 also saves the model and the meta.
    Order: meta of an older save of the same step removed, then model + optimizer shards, then (after all ranks
    are done, when distributed) the meta. So a crash at any point never leaves a meta that points at
    incomplete files, and never touches other steps' files."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        # Re-saving a step: un-publish it first, so a crash mid-save can't leave old meta + new weights.
        os.remove(meta_path(checkpoint_dir, step))
    if rank == 0 and model_data is not None:
        atomic_torch_save(model_data, model_path(checkpoint_dir, step))
        log0(f"Saved model parameters to: {model_path(checkpoint_dir, step)}")
    if optimizer_data is not None:
        atomic_torch_save(optimizer_data, optim_path(checkpoint_dir, step, rank))
        log0(f"Saved optimizer state to: {optim_path(checkpoint_dir, rank=rank, step=step)}")
    # Optimizer shards are written by every rank: wait for all of them before publishing the meta.
    # (Callers that save from rank 0 only, like RL, pass optimizer_data=None and skip this barrier.)
    if optimizer_data is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        atomic_json_save(nanochat_readable_meta(meta_data), meta_path(checkpoint_dir, step))
        log0(f"Saved metadata to: {meta_path(checkpoint_dir, step)}")


def available_steps(checkpoint_dir):
    """Steps with a complete checkpoint (model_<digits>.pt + its meta), sorted ascending.
    Stray files such as model_000200_backup.pt or half-written temp files are ignored."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        match = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if match and os.path.exists(meta_path(checkpoint_dir, int(match.group(1)))):
            steps.append(int(match.group(1)))
    return sorted(steps)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta_data)."""
    if not os.path.exists(meta_path(checkpoint_dir, step)) or not os.path.exists(model_path(checkpoint_dir, step)):
        raise FileNotFoundError(
            f"No complete checkpoint for step {step} in {checkpoint_dir} "
            f"(complete steps there: {available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else 'none, the directory does not exist'}). "
            f"Pass a step that exists, or omit the step to use the last one.")
    with open(meta_path(checkpoint_dir, step), "r", encoding="utf-8") as f:
        meta_data = json.load(f)
    model_data = torch.load(model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    optimizer_data = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            shards = sorted(glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")))
            raise FileNotFoundError(
                f"Optimizer shard {path} is missing (found {len(shards)} shard(s) for step {step}). Optimizer state is "
                f"sharded per rank: resume with the same number of processes that saved it, or start the optimizer "
                f"fresh (e.g. chat_sft --load-optimizer 0).")
        optimizer_data = torch.load(path, map_location=device, weights_only=True)
    return model_data, optimizer_data, meta_data


# -----------------------------------------------------------------------------
# Build a model from a checkpoint

def patch_model_config(model_config):
    """Make configs written by older nanochat versions (and by us) acceptable to GPTConfig."""
    model_config = dict(model_config)
    model_config.setdefault("window_pattern", "L")  # before sliding windows, every layer attended to all tokens
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(model_config) - known)
    if unknown:
        log0(f"Ignoring model_config fields this GPTConfig does not know: {unknown}")
    return {k: v for k, v in model_config.items() if k in known}


def patch_state_dict(model_data, model):
    """Adapt a saved state dict to `model`: strip torch.compile's `_orig_mod.` prefix, fill parameters that older
    checkpoints predate with their neutral values, and cast floating tensors to the dtype the freshly initialized
    model uses on this device (e.g. bf16 GPU checkpoints -> fp32 on CPU/MPS)."""
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    expected = model.state_dict()
    n_layer = model.config.n_layer
    # Older checkpoints had no per-layer residual scalars: the neutral values are resid=1, x0=0.
    if "resid_lambdas" in expected and "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0("Checkpoint predates resid_lambdas: using 1.0 (no change to the residual stream)")
    if "x0_lambdas" in expected and "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0("Checkpoint predates x0_lambdas: using 0.0 (no x0 skip connection)")
    missing = sorted(set(expected) - set(model_data))
    extra = sorted(set(model_data) - set(expected))
    if missing or extra:
        raise RuntimeError(
            f"Checkpoint does not match the model architecture. Missing in checkpoint: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; unexpected in checkpoint: {extra[:10]}{' ...' if len(extra) > 10 else ''}. "
            f"Was it written by a different model version or with a different config?")
    out = {}
    for k, v in model_data.items():
        target = expected[k]
        if v.is_floating_point() and target.is_floating_point() and v.dtype != target.dtype:
            v = v.to(target.dtype)
        out[k] = v.to(target.device)
    return out


def build_model_from_data(model_data, meta_data, device):
    """GPT from a meta dict and a state dict: built on the meta device, storage on `device`, init_weights()
    (which also fills non-persistent buffers such as the rotary tables), then the saved weights assigned."""
    device = torch.device(device)
    model_config_kwargs = patch_model_config(meta_data["model_config"])
    log0(f"Building model with config: {model_config_kwargs}")
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config_kwargs))
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(patch_state_dict(model_data, model), strict=True, assign=True)
    return model


def build_model(checkpoint_dir, step, device, phase):
    """Returns (model, tokenizer, meta): the uncompiled model in train/eval mode, the tokenizer from
    $NANOCHAT_BASE_DIR/tokenizer, and the checkpoint's meta dict."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    model = build_model_from_data(model_data, meta_data, device)
    del model_data
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    check_vocab_compatible(tokenizer, meta_data["model_config"]["vocab_size"], checkpoint_dir)
    return model, tokenizer, meta_data


def check_vocab_compatible(tokenizer, model_vocab_size, where):
    tok_vocab = tokenizer.get_vocab_size()
    if tok_vocab != model_vocab_size:
        raise ValueError(
            f"Tokenizer/model mismatch: the checkpoint in {where} was trained with vocab_size={model_vocab_size}, "
            f"but the tokenizer in {os.path.join(get_base_dir(), 'tokenizer')} has {tok_vocab} tokens. Use the "
            f"tokenizer the model was trained with (set NANOCHAT_BASE_DIR to the directory holding both).")


# -----------------------------------------------------------------------------
# Finding checkpoints by convention

def find_largest_model(checkpoint_dir):
    """Model tag to use when none is given: the largest d<N> tag (ties: most recently modified), else the most
    recently modified tag. Only tags that hold at least one complete checkpoint count."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"No checkpoints directory {checkpoint_dir}. Train a model first (or check NANOCHAT_BASE_DIR).")
    tags = [t for t in os.listdir(checkpoint_dir)
            if os.path.isdir(os.path.join(checkpoint_dir, t)) and available_steps(os.path.join(checkpoint_dir, t))]
    if not tags:
        raise FileNotFoundError(f"No complete checkpoints found in {checkpoint_dir}")
    mtime = lambda t: os.path.getmtime(os.path.join(checkpoint_dir, t))
    depth_tags = [(int(m.group(1)), mtime(t), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[2]
    return max(tags, key=mtime)


def find_last_step(checkpoint_dir):
    """Highest step with a complete checkpoint (model_<digits>.pt and meta_<digits>.json)."""
    steps = available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    if not steps:
        raise FileNotFoundError(f"No complete checkpoints (model_<step>.pt + meta_<step>.json) found in {checkpoint_dir}")
    return steps[-1]


def checkpoints_root(source):
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"Unknown checkpoint source {source!r}; expected one of {', '.join(CHECKPOINT_DIRS)}")
    return os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, using: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, *args, **kwargs):
    """load_model(source, device, phase, model_tag=None, step=None) -> (model, tokenizer, meta).
    source: base | mid | sft | rl | dpo, or a Hugging Face folder written by scripts.export_hf, or a hub repo id
    (org/name or hf://org/name) holding one."""
    if source in CHECKPOINT_DIRS:
        return load_model_from_dir(checkpoints_root(source), *args, **kwargs)
    return load_exported_model(source, *args, **kwargs)


def load_exported_model(source, device, phase, model_tag=None, step=None):
    """An exported folder / hub repo as (model, tokenizer, meta): the tokenizer is the folder's own."""
    from nanochat.hf import load as hf_load  # here: huggingface_hub and tokenizers add import time only this path needs
    if model_tag is not None or step is not None:
        raise ValueError(f"{source} holds one exported model: --model-tag / --step only pick checkpoints under "
                         f"{get_base_dir()}")
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    folder = hf_load.resolve_folder(source)
    log0(f"Loading exported model from {folder}")
    model_data, meta_data, tokenizer = hf_load.read_folder(folder)
    model = build_model_from_data(model_data, meta_data, device)
    hf_load.check_built_model(model, meta_data["hf_config"])
    model.train(phase == "train")
    check_vocab_compatible(tokenizer, meta_data["model_config"]["vocab_size"], folder)
    return model, tokenizer, meta_data
