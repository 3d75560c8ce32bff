"""
Saving and loading checkpoints, in nanochat's layout so checkpoints move freely between the two:

    $NANOCHAT_BASE_DIR/<phase>_checkpoints/<model_tag>/
        model_<step:06d>.pt          state_dict of the uncompiled model (rank 0)
        optim_<step:06d>_rank<r>.pt  each rank's optimizer shard
        meta_<step:06d>.json         model_config, user_config, loop/dataloader state ...

Saves are atomic: every file is written to a temp file in the same directory, fsynced and renamed into
place, and the meta file is written last. A checkpoint "exists" only once its meta file is there, so a crash
(or a kill) in the middle of a save leaves the previous good checkpoint as the latest loadable one.

What can go wrong is a UserError (one line, exit 2 from the scripts) that names the path and what to do: a
directory that cannot be written or lacks room for a checkpoint (`check_can_save`, before training starts, with
`estimate_checkpoint_bytes`), a save that fails on a full or read-only disk, weights with NaN/inf (never saved),
damaged files (`CorruptCheckpointError`; `find_last_loadable_step` skips them), a checkpoint trained with
another tokenizer (`check_tokenizer_matches`, by the fingerprint in its meta).
"""

import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import fields

import torch
import torch.distributed as dist

from nanochat.cli import MissingFileError, UserError
from nanochat.common import get_base_dir, is_rank0
from nanochat.fileio import atomic_write_text, discard_temp, open_temp, publish, remove_stale_temp_files
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf import is_exported_folder
from nanochat.tokenizer import get_tokenizer

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


def warn0(message):
    if is_rank0():
        logger.warning(message)


class CheckpointNotFoundError(MissingFileError):
    """No (complete) checkpoint where one was asked for."""


class CorruptCheckpointError(UserError):
    """A checkpoint file that cannot be read (truncated, a partial copy, damaged)."""


class NonFiniteWeightsError(UserError):
    """Weights with NaN/inf: the run diverged; they are never saved. Exit status 3 (2 is a bad command)."""
    exit_code = 3


class TokenizerMismatchError(UserError):
    """A checkpoint loaded with a tokenizer other than the one it was trained with."""


def gib(num_bytes):
    return f"{num_bytes / 2 ** 30:.2f} GiB"


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


# -----------------------------------------------------------------------------
# Atomic file writes (nanochat.fileio): a crash mid-save never leaves a half-written file in place

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
    Order: temp files of killed saves removed; the model and optimizer shards written to temp files (a previous
    save of this step stays published meanwhile); then in quick succession the old meta of this step removed,
    the temp files renamed into place and (after all ranks are done, when distributed) the new meta written. So a
    crash at any point never leaves a meta that points at incomplete or other files, un-publishes a re-saved
    step only for the moment of a few renames, and never touches other steps' files. Weights with NaN/inf are
    refused (NonFiniteWeightsError); a full or read-only disk is a UserError naming the path."""
    if model_data is not None:  # every rank holding the weights checks them, so all ranks stop together
        check_finite_weights(model_data, step)
    # Optimizer shards are written by every rank: they wait for each other between the phases.
    # (Callers that save from rank 0 only, like RL, pass optimizer_data=None and skip these barriers.)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    all_ranks = optimizer_data is not None and distributed
    barrier = dist.barrier if all_ranks else (lambda: None)
    files = []
    if rank == 0 and model_data is not None:
        files.append((model_path(checkpoint_dir, step), model_data))
    if optimizer_data is not None:
        files.append((optim_path(checkpoint_dir, step, rank), optimizer_data))
    writing = checkpoint_dir
    try:
        os.makedirs(checkpoint_dir, exist_ok=True)
        if rank == 0:
            for path in remove_stale_temp_files(checkpoint_dir):
                log0(f"Removed the temp file of an interrupted save: {path}")
        barrier()  # nobody writes before the stale files are gone (their pids mean nothing on other nodes)
        for writing, data in files:
            with open_temp(writing, "wb") as f:
                torch.save(data, f)
        if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
            # Re-saving a step: un-publish it before its files change, so a crash can't leave old meta + new weights.
            os.remove(meta_path(checkpoint_dir, step))
        barrier()
        for writing, _ in files:
            publish(writing)
            log0(f"Saved {os.path.basename(writing)} to {checkpoint_dir}")
        barrier()
        if rank == 0:
            writing = meta_path(checkpoint_dir, step)
            atomic_json_save(nanochat_readable_meta(meta_data), writing)
            log0(f"Saved metadata to: {writing}")
    except BaseException as e:
        for path, _ in files:
            discard_temp(path)
        disk_error = find_disk_error(e)
        if disk_error is not None:
            raise save_error(disk_error, checkpoint_dir, step, writing) from e
        raise


# a save that fails with these is the disk's or the user's problem, not a bug: say so in one line
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def find_disk_error(e):
    """The OSError with one of DISK_ERRORS behind `e`, or None. torch.save on a full disk raises a RuntimeError
    ('unexpected pos ...') while handling the OSError of the write that failed, so the chain is searched."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def save_error(e, checkpoint_dir, step, path):
    """The one-line error of a save that failed on the disk: what happened, where, and what is left."""
    kept = [s for s in available_steps(checkpoint_dir) if s != step] if os.path.isdir(checkpoint_dir) else []
    left = (f"the last good checkpoint, step {kept[-1]}, is intact" if kept else "no earlier checkpoint is there")
    fix = ("free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable")
    return UserError(f"could not save the checkpoint of step {step}: {(e.strerror or str(e)).lower()} writing {path} "
                     f"({left} in {checkpoint_dir}). {fix.capitalize()} or set NANOCHAT_BASE_DIR to another disk, "
                     f"then resume with --resume-from-step last")


def check_finite_weights(model_data, step):
    """Raise NonFiniteWeightsError naming the tensors with NaN/inf: a diverged model is never saved."""
    bad = [name for name, t in model_data.items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"the weights at step {step} hold NaN/inf ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}), so they "
            f"were not saved: the run diverged. Lower the learning rates and resume from the last good checkpoint")


def estimate_checkpoint_bytes(model, optimizer=None):
    """Bytes one save writes: the model's state dict plus, with an optimizer, every rank's shard of its state.
    Before the first step the optimizer holds no state yet: two fp32 tensors per parameter are counted (AdamW's
    moments; Muon keeps less), so the estimate errs on the side of room."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    if optimizer is not None:
        state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        if state:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            total += world_size * sum(t.numel() * t.element_size() for t in state)
        else:
            total += sum(2 * 4 * p.numel() for p in model.parameters())
    return total + 2 ** 20  # the meta file and the file system's own overhead


def check_can_save(directory, bytes_needed):
    """Before the first step: `directory` can be created and written, and its disk has `bytes_needed` free (one
    checkpoint: estimate_checkpoint_bytes). Raises UserError naming the path and the numbers, so a run never
    trains for hours to fail at its first save."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # a real write: root passes any permission check, not EROFS
            pass
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {(e.strerror or str(e)).lower()}. Make it writable or set "
                        f"NANOCHAT_BASE_DIR to a writable directory") from None
    free = shutil.disk_usage(directory).free
    if free < bytes_needed:
        raise UserError(f"not enough disk space in {directory}: a checkpoint needs about {gib(bytes_needed)} but "
                        f"{gib(free)} is free. Free some space or set NANOCHAT_BASE_DIR to a disk with room")


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
    """Returns (model_data, optimizer_data or None, meta_data). A damaged file is a CorruptCheckpointError."""
    if not os.path.exists(meta_path(checkpoint_dir, step)) or not os.path.exists(model_path(checkpoint_dir, step)):
        raise CheckpointNotFoundError(
            f"No complete checkpoint for step {step} in {checkpoint_dir} "
            f"(complete steps there: {available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else 'none, the directory does not exist'}). "
            f"Pass a step that exists, or omit the step to use the last one.")
    meta_data = read_meta(meta_path(checkpoint_dir, step))
    model_data = load_torch_file(model_path(checkpoint_dir, step), device)
    optimizer_data = load_optimizer_shard(checkpoint_dir, step, device, rank) if load_optimizer else None
    return model_data, optimizer_data, meta_data


def load_optimizer_shard(checkpoint_dir, step, device, rank=0):
    """One rank's optimizer state of a checkpoint, without its weights. A missing shard is a
    CheckpointNotFoundError that says what to do."""
    path = optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        shards = sorted(glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")))
        raise CheckpointNotFoundError(
            f"Optimizer shard {path} is missing (found {len(shards)} shard(s) for step {step}). Optimizer state is "
            f"sharded per rank: resume with the same number of processes that saved it, or start the optimizer "
            f"fresh (e.g. chat_sft --load-optimizer 0).")
    return load_torch_file(path, device)


def damaged(path, reason):
    steps = available_steps(os.path.dirname(path))
    return CorruptCheckpointError(
        f"{path} cannot be read ({reason}): the file is truncated or damaged (a full disk, a partial copy). Restore "
        f"it from a copy, or use another step (complete steps there: {steps}); --resume-from-step last skips "
        f"damaged steps")


def read_meta(path):
    """A checkpoint's meta dict; a file that is not JSON is a CorruptCheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, f"not valid JSON: {e}") from None


def zip_damage(path):
    """Why the torch file at `path` is not a whole zip archive (torch.save's format), or None: a truncated file
    loses the archive's table of contents, which sits at its end."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def load_torch_file(path, device):
    """torch.load of a checkpoint file; when it fails on a damaged file, a CorruptCheckpointError naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = zip_damage(path)
        if reason is None:  # the archive is whole: some other problem (memory, an unsupported object), as it is
            raise
        raise damaged(path, reason) from e


def check_checkpoint_readable(checkpoint_dir, step):
    """Cheap check that a step's meta parses and its model and optimizer shards are whole archives (without
    loading any tensor). Raises CorruptCheckpointError naming the first damaged file."""
    read_meta(meta_path(checkpoint_dir, step))
    shards = sorted(glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")))
    paths = [model_path(checkpoint_dir, step)] + shards
    for path in paths:
        reason = zip_damage(path)
        if reason is not None:
            raise damaged(path, reason)


def find_last_loadable_step(checkpoint_dir):
    """--resume-from-step last: the highest complete step whose files all read (every rank's shard, so all
    ranks agree), skipping damaged ones with a warning that says which step is used instead."""
    skipped = []
    for step in reversed(available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []):
        try:
            check_checkpoint_readable(checkpoint_dir, step)
        except CorruptCheckpointError as e:
            warn0(f"{e}")
            skipped.append(step)
            continue
        if skipped:
            warn0(f"Step(s) {skipped} of {checkpoint_dir} cannot be read: using step {step}, the newest checkpoint "
                  f"that loads")
        return step
    if skipped:
        raise CorruptCheckpointError(f"no checkpoint in {checkpoint_dir} can be read (steps {skipped} are damaged): "
                                     f"restore them from a copy or start fresh")
    return find_last_step(checkpoint_dir)  # raises: there is none


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
    $NANOCHAT_BASE_DIR/tokenizer, and the checkpoint's meta dict. An exported Hugging Face folder (step ignored)
    brings its own tokenizer (see load_exported_model)."""
    if is_exported_folder(checkpoint_dir):
        return load_exported_model(checkpoint_dir, device, phase)
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    model = build_model_from_data(model_data, meta_data, device)
    del model_data
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    check_vocab_compatible(tokenizer, meta_data["model_config"]["vocab_size"], checkpoint_dir)
    check_tokenizer_matches(meta_data, tokenizer, f"{checkpoint_dir} step {step}")
    return model, tokenizer, meta_data


def check_tokenizer_matches(meta_data, tokenizer, where):
    """The checkpoint's tokenizer fingerprint (recorded by training.checkpoint_meta) must be the tokenizer's:
    a retrained tokenizer of the same size silently scrambles every token otherwise. Checkpoints from before
    fingerprints (and nanochat's) load with a note."""
    saved = meta_data.get("tokenizer_fingerprint")
    if saved is None:
        log0(f"NOTE: the checkpoint {where} records no tokenizer fingerprint (written before they were, or by "
             f"nanochat): only its vocab size could be checked against the tokenizer")
        return
    current = tokenizer.fingerprint()
    if saved != current:
        raise TokenizerMismatchError(
            f"the checkpoint {where} was trained with tokenizer {saved}, but the tokenizer in "
            f"{os.path.join(get_base_dir(), 'tokenizer')} is {current} (retrained since?). Use the tokenizer the "
            f"model was trained with (restore tokenizer/ from a copy, or set NANOCHAT_BASE_DIR to the directory "
            f"holding both), or train the model again with this one")


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
        raise CheckpointNotFoundError(f"No checkpoints directory {checkpoint_dir}. Train a model first (or check NANOCHAT_BASE_DIR).")
    tags = [t for t in os.listdir(checkpoint_dir)
            if os.path.isdir(os.path.join(checkpoint_dir, t)) and available_steps(os.path.join(checkpoint_dir, t))]
    if not tags:
        raise CheckpointNotFoundError(f"No complete checkpoints found in {checkpoint_dir}")
    mtime = lambda t: os.path.getmtime(os.path.join(checkpoint_dir, t))
    depth_tags = [(int(m.group(1)), mtime(t), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[2]
    return max(tags, key=mtime)


def find_last_step(checkpoint_dir):
    """Highest step with a complete checkpoint (model_<digits>.pt and meta_<digits>.json)."""
    steps = available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    if not steps:
        raise CheckpointNotFoundError(f"No complete checkpoints (model_<step>.pt + meta_<step>.json) found in {checkpoint_dir}")
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
