"""
What every trainer (base_train, chat_sft, and the RL and DPO stages built on them) needs around its own loop:

- where it runs: `init_runtime` (device, ranks, the GPU's peak FLOP/s) and `init_wandb` (or a stand-in);
- the batch: `compute_grad_accum_steps` (with the error that says which flags to change), `step_loss_scale`
  (a step's loss as the mean over every trained token of all micro-batches and ranks), `check_memory_fits`
  (refuses a model or batch that cannot fit, with the numbers, before anything is allocated);
- schedules: by step (pretraining) or by progress through the run (fine-tuning), Muon momentum and weight decay;
- fine-tuning from a checkpoint: `find_checkpoint`, `resolve_start` (the source, or the run's own checkpoint when
  resuming, and where to save), `read_checkpoint_meta`, `inherit_settings` (flags left unset take the source's
  values), `warm_start_optimizer`, `scale_learning_rates`;
- speed: `compile_with_fallback`, `ManualGC` (no collector pauses), `StepMeter` (the step line with loss, tok/s,
  MFU, training time and ETA);
- saving: `checkpoint_meta` (the meta fields nanochat's loaders read, and the tokenizer's fingerprint),
  `gather_from_ranks`, `peak_memory_mib`; `check_finite_loss` stops a diverged run before it saves anything.
  (checkpoint_manager has `check_can_save` and `estimate_checkpoint_bytes`, to call before step 0.)

Errors the user can fix are `UserError`s (nanochat.cli): the scripts print them as one line and exit 2.
"""

import gc
import math
import os
import re
import shutil
import time
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist

from nanochat import chunked_loss
from nanochat.checkpoint_manager import (CHECKPOINT_DIRS, CheckpointNotFoundError, available_steps, checkpoints_root,
                                         find_largest_model, find_last_step, gib, load_optimizer_shard, meta_path,
                                         read_meta, save_checkpoint, check_can_save, estimate_checkpoint_bytes)
from nanochat.cli import UserError
from nanochat.common import (COMPUTE_DTYPE, DummyWandb, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_peak_flops, print0)
from nanochat.hf import is_exported_folder
from nanochat.hf import load as hf_load
from nanochat.tokenizer import TOKENIZER_FILENAME, get_tokenizer, save_token_bytes

try:
    import resource  # peak RSS; Unix only
except ImportError:
    resource = None


# -----------------------------------------------------------------------------
# Where the run computes

@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: device, rank, world size, and the GPU's peak bf16 FLOP/s for MFU
    (0 on CPU/MPS or an unknown GPU: MFU then reads 0)."""
    device_type: str
    device: torch.device
    ddp: bool
    rank: int
    world_size: int
    peak_flops: float

    @property
    def master(self):
        return self.rank == 0

    def synchronize(self):
        """Wait for the device, so a wall-clock interval covers the work queued in it."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()


def init_runtime(device_type="", seed=42):
    """Seed, pick the device (autodetected when empty) and join torchrun's process group (nanochat.common)."""
    device_type = device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type, seed)
    peak_flops = get_peak_flops(torch.cuda.get_device_name(0)) if device_type == "cuda" else 0.0
    return Runtime(device_type, device, ddp, rank, world_size, peak_flops)


def init_wandb(run_name, project, config, master):
    """A wandb run on rank 0 when --run is not 'dummy', else a stand-in that logs nothing."""
    if run_name == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb  # optional dependency, and seconds to import: only when a run is logged
    except ImportError:
        raise SystemExit("ERROR: --run was given but wandb is not installed: pip install wandb, or pass --run dummy") from None
    return wandb.init(project=project, name=run_name, config=config)


def make_grad_scaler():
    """fp16 needs loss scaling (its range is small); bf16 and fp32 do not."""
    return torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None


def backward(loss, scaler):
    (scaler.scale(loss) if scaler is not None else loss).backward()


# -----------------------------------------------------------------------------
# The batch

def compute_grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size):
    """Micro-steps per optimizer step; the total batch must be an exact multiple of one micro-step on all ranks."""
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step == 0 and total_batch_size >= per_step:
        return total_batch_size // per_step
    lower = max(per_step, total_batch_size // per_step * per_step)
    upper = lower + per_step if lower < total_batch_size else lower
    # a device batch size that works divides total / (seq len x ranks): no need to look past that (or past 4x
    # the one asked for), however large the one asked for is
    largest = min(device_batch_size * 4, total_batch_size // (max_seq_len * world_size))
    ok_device_bs = [b for b in range(1, largest + 1) if total_batch_size % (b * max_seq_len * world_size) == 0]
    hint = (f" or a --device-batch-size that divides it: {ok_device_bs[-6:]}" if ok_device_bs else
            f" (no --device-batch-size works with --max-seq-len {max_seq_len} on {world_size} rank(s))")
    raise UserError(
        f"Total batch size {total_batch_size:,} tokens is not a multiple of one micro-step over all ranks: "
        f"--device-batch-size {device_batch_size} x --max-seq-len {max_seq_len} x {world_size} rank(s) = {per_step:,} tokens. "
        f"Set --total-batch-size to a multiple of {per_step:,} (e.g. {lower:,} or {upper:,}){hint}.")


def estimate_training_bytes(model, device_batch_size, max_seq_len, world_size):
    """A lower bound on one device's memory for training `model` (the meta-device model is enough), as
    {what: bytes}: 8 bytes per parameter for the weights and their gradients plus 4 for optimizer state (Muon's
    momentum, AdamW's two moments; sharded over ranks) -- bf16 embedding tables on CUDA still come to at least
    that with AdamW's fp32 moments -- and the residual stream of every layer that backward keeps, in the compute
    dtype (the real activations are many times more)."""
    num_params = sum(p.numel() for p in model.parameters())
    config = model.config
    residual = device_batch_size * max_seq_len * config.n_embd * config.n_layer * COMPUTE_DTYPE.itemsize
    return {"weights, gradients and optimizer state": num_params * (8 + 4 / world_size), "activations": residual}


def available_memory_bytes(device_type):
    """Free memory of this process's device: the GPU's free memory on CUDA, else the system's available RAM."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[0]
    return psutil.virtual_memory().available


def check_memory_fits(model, device_batch_size, max_seq_len, runtime, model_loaded=False):
    """Before allocating: refuse (UserError, with the numbers) a model or device batch whose lower-bound memory
    (estimate_training_bytes) exceeds what the device has free. `model_loaded`: the model's weights are already
    on the device (so they count as available). Only a lower bound refuses, so a run that could fit never is."""
    parts = estimate_training_bytes(model, device_batch_size, max_seq_len, runtime.world_size)
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if model_loaded else 0
    needed, available = sum(parts.values()), available_memory_bytes(runtime.device_type) + loaded
    if needed > available:
        detail = " + ".join(f"{gib(v)} {k}" for k, v in parts.items())
        raise UserError(f"training this model (d{model.config.n_layer}, {sum(p.numel() for p in model.parameters()):,} "
                        f"parameters) at --device-batch-size {device_batch_size} x {max_seq_len} tokens needs at least "
                        f"{gib(needed)} ({detail}) but this {runtime.device_type} device has {gib(available)} free. "
                        f"Use a smaller --depth or --device-batch-size (or more devices)")


def print_batch_arithmetic(device_batch_size, max_seq_len, total_batch_size, grad_accum_steps):
    print0(f"Tokens / micro-batch / rank: {device_batch_size} x {max_seq_len} = {device_batch_size * max_seq_len:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")


def step_loss_scale(micro_batches, world_size, ddp):
    """Scale that turns each micro-batch's *summed* per-token loss into its share of the step's mean loss over
    every trained token of the step (all micro-batches, all ranks). The optimizer averages gradients over
    ranks, hence the world_size factor. max(1, .) makes a step without any trained token a zero-gradient
    step instead of a division by zero. Returns (scale, number of trained tokens in the step)."""
    device = micro_batches[0][1].device
    count = torch.zeros((), dtype=torch.long, device=device)
    for _, y in micro_batches:
        count += (y >= 0).sum()
    if ddp:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    num_tokens = int(count.item())
    return world_size / max(1, num_tokens), num_tokens


def mean_over_ranks(value, runtime):
    """A scalar tensor averaged over ranks (one tiny all-reduce), as a float."""
    if runtime.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / runtime.world_size
    return value.item()


def sum_over_ranks(values, runtime):
    """A list, or a dict of names to numbers, summed over ranks (one float64 all-reduce); same type back."""
    names = sorted(values) if isinstance(values, dict) else None
    numbers = [float(values[k]) for k in names] if names is not None else [float(v) for v in values]
    if runtime.ddp:
        t = torch.tensor(numbers, dtype=torch.float64, device=runtime.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        numbers = t.tolist()
    return dict(zip(names, numbers)) if names is not None else numbers


# -----------------------------------------------------------------------------
# Schedules (step or progress -> value), nanochat's

def lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """By step (pretraining): linear warmup, flat, linear warmdown over the last warmdown_ratio of the run to
    final_lr_frac."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def progress_lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """By progress 0 -> 1 through the run (fine-tuning, where an epoch rather than a step count may end it):
    linear warmup, flat, linear warmdown to final_lr_frac. (0, 1, 0) is RL's linear ramp down to zero."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if warmdown_ratio <= 0 or progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min(1.0, (progress - (1.0 - warmdown_ratio)) / warmdown_ratio)
    return (1 - decay) + decay * final_lr_frac


MUON_MOMENTUM = 0.95  # Muon's momentum where a stage does not schedule it (RL, DPO): setup_optimizer's value


def linear_ramp(step, start, end, ramp_steps):
    """start -> end linearly over ramp_steps, then end (Muon momentum warmup: 0.85 -> 0.95 over 300 in SFT)."""
    frac = min(step / ramp_steps, 1)
    return (1 - frac) * start + frac * end


def muon_momentum(it, num_iterations, warmdown_ratio):
    """Pretraining: 0.85 -> 0.97 over the first 400 steps, flat, then 0.97 -> 0.90 during the LR warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        return linear_ramp(it, 0.85, 0.97, 400)
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(it, num_iterations, weight_decay):
    """Cosine from weight_decay to zero over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


# -----------------------------------------------------------------------------
# Fine-tuning from a checkpoint

def find_checkpoint(kind, tag=None, step=None):
    """(directory, tag, step) of a checkpoint of `kind` (base|mid|sft|rl|dpo): the largest model and its last
    step unless given."""
    root = checkpoints_root(kind)
    tag = tag or find_largest_model(root)
    directory = os.path.join(root, tag)
    return directory, tag, find_last_step(directory) if step is None else step


@dataclass(frozen=True)
class StartPoint:
    """Where a fine-tuning run's weights come from and where its checkpoints go. Fresh: from the source
    checkpoint; resuming: from the run's own checkpoint at resume_step (meta is the start checkpoint's)."""
    source_tag: str
    source_step: int
    source_dir: str
    start_dir: str
    start_step: int
    output_dir: str
    step_offset: int  # checkpoint numbers = this run's steps + step_offset (fine-tuning into the source's dir)
    resume_step: int  # -1: a fresh run
    meta: dict

    @property
    def resuming(self):
        return self.resume_step >= 0


def resolve_start(source, model_tag, model_step, output_kind, output_tag, resume_from_step):
    """The StartPoint of a run that fine-tunes a `source` checkpoint (base|mid|sft|rl|dpo, or a published model:
    an exported Hugging Face folder or hub repo id) into output_kind's checkpoints under output_tag (default: the
    source's tag), or resumes from its own step resume_from_step (>= 0). Reads only the start checkpoint's meta.
    Saving into the source's own directory numbers the run's steps after the source's, so nothing is
    overwritten."""
    if source in CHECKPOINT_DIRS:
        source_dir, source_tag, source_step = find_checkpoint(source, model_tag, model_step)
    else:
        source_dir, source_tag, source_step = adopt_published_model(source, model_tag, model_step)
    output_dir = os.path.join(checkpoints_root(output_kind), output_tag or source_tag)
    resuming = resume_from_step >= 0
    start_dir, start_step = (output_dir, resume_from_step) if resuming else (source_dir, source_step)
    print0(f"{'Resuming' if resuming else 'Starting'} from {start_dir} step {start_step}")
    meta = read_checkpoint_meta(start_dir, start_step)
    if resuming:
        step_offset = meta["loop_state"]["step_offset"]
    else:
        step_offset = source_step if os.path.abspath(output_dir) == os.path.abspath(source_dir) else 0
        if step_offset:
            print0(f"NOTE: saving into the source's own directory: this run's checkpoints are numbered from step {step_offset}")
        elif os.path.isdir(output_dir) and available_steps(output_dir):
            print0(f"NOTE: {output_dir} already holds checkpoints at steps {available_steps(output_dir)}; "
                   f"same-numbered ones will be replaced")
    return StartPoint(source_tag, source_step, source_dir, start_dir, start_step, output_dir, step_offset,
                      resume_from_step, meta)


def adopt_published_model(source, model_tag, model_step):
    """(folder, tag, 0) for fine-tuning an exported folder or hub repo. Checkpoints trained from it must load with
    its tokenizer, so that tokenizer becomes $NANOCHAT_BASE_DIR's (written there when the base dir has none;
    a different one there is refused: start from a fresh NANOCHAT_BASE_DIR)."""
    if model_tag is not None or model_step is not None:
        raise UserError(f"--source {source} is one published model: --model-tag / --model-step pick checkpoints "
                        f"under $NANOCHAT_BASE_DIR only")
    try:
        folder = hf_load.resolve_folder(source)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    tokenizer = hf_load.read_folder_tokenizer(folder)
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    if os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILENAME)):
        if get_tokenizer().fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{tokenizer_dir} holds another tokenizer than {source}'s: checkpoints fine-tuned from it "
                            f"would not load with either. Use a fresh NANOCHAT_BASE_DIR for this model.")
    else:
        tokenizer.save(tokenizer_dir)
        save_token_bytes(tokenizer, tokenizer_dir)
        print0(f"Installed {source}'s tokenizer in {tokenizer_dir}")
    tag = re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(source.removeprefix("hf://")))) or "published"
    return folder, tag, 0


def read_checkpoint_meta(checkpoint_dir, step):
    """A checkpoint's meta dict, without loading its weights (to resolve a run's settings before building it).
    For an exported folder, its nanochat_meta.json (step ignored)."""
    if is_exported_folder(checkpoint_dir):
        return hf_load.read_folder_meta(checkpoint_dir)
    path = meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        steps = available_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else "none, the directory does not exist"
        raise CheckpointNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir} (complete steps there: "
                                      f"{steps}). Pass a step that exists, or omit the step to use the last one.")
    return read_meta(path)


def inherit_settings(rows):
    """rows: (name, flag value or None, the source checkpoint's value or None, default). Returns {name: value}:
    the flag when given, else the source's value, else the default, printing where each one came from."""
    resolved = {}
    for name, flag_value, source_value, default in rows:
        if flag_value is None:
            value = source_value if source_value is not None else default
            origin = "the source checkpoint" if source_value is not None else "the default (not in the checkpoint)"
            print0(f"Inherited {name}={value} from {origin}")
        else:
            value = flag_value
            if source_value is not None and flag_value != source_value:
                print0(f"NOTE: --{name.replace('_', '-')}={flag_value} overrides the source checkpoint's value of {source_value}")
            else:
                print0(f"Using {name}={flag_value}")
        resolved[name] = value
    return resolved


def warm_start_optimizer(optimizer, checkpoint_dir, step, runtime, required):
    """Load this rank's optimizer shard (momentum buffers, second moments) from a checkpoint but keep the LRs and
    weight decay this run set up (pretraining ends near zero LR). A missing shard is an error when `required`
    (resuming), else a warning and a fresh optimizer."""
    try:
        optimizer_data = load_optimizer_shard(checkpoint_dir, step, runtime.device, runtime.rank)
    except FileNotFoundError as e:
        if required:
            raise
        print0(f"WARNING: no optimizer state to warm-start from ({str(e).splitlines()[0][:200]}); starting fresh")
        return
    load_optimizer_state(optimizer, optimizer_data)
    print0(f"Loaded optimizer state from {checkpoint_dir} step {step} (LRs reset to this run's)")


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer state (momentum buffers, second moments) but keep the LRs and weight decay this run
    set up, so a resumed run follows its own flags: lower LRs are how a diverged run is resumed."""
    fresh = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)


def scale_learning_rates(optimizer, frac):
    """Every group's LR (and the initial_lr the schedules scale) times frac, e.g. SFT's --init-lr-frac."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * frac
        group["initial_lr"] = group["lr"]


# -----------------------------------------------------------------------------
# Speed

def should_compile(flag, device_type):
    """--compile: 1 yes, 0 no, -1 auto = CUDA, or CPU when a C++ compiler is there for inductor (faster steps and
    less memory on CPU too, once the minute or so of compilation is paid)."""
    if flag != -1:
        return flag == 1
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return True
        print0("NOTE: no C++ compiler found, so torch.compile is off on CPU (install g++/clang for faster steps and less memory)")
    return False


def compile_with_fallback(model, x, y, **forward_kwargs):
    """torch.compile the model and compile it now, on one forward/backward of (x, y) (gradients discarded, no
    data consumed), so a compiler problem falls back to eager with a warning instead of killing the run later.
    Returns the model to train with; keep `model` itself (uncompiled) for saving, sampling and evaluations
    whose shapes vary."""
    compiled = torch.compile(model, dynamic=False)  # input shapes never change during training
    chunked_loss.COMPILE_ELEMENTWISE = True  # the CPU loss's per-chunk kernel too (unused on GPUs)
    t0 = time.time()
    try:
        compiled(x, y, **forward_kwargs).backward()
    except Exception as e:
        print0(f"WARNING: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
               f"training uncompiled (pass --compile 0 to skip the attempt)")
        compiled = model
        chunked_loss.COMPILE_ELEMENTWISE = False
    model.zero_grad(set_to_none=True)
    print0(f"Compilation warm-up: {time.time() - t0:.1f}s")
    return compiled


class ManualGC:
    """Python's cyclic GC scans every long-lived object of the setup again and again (pauses of ~0.5 s): after the
    first step of the run, collect once, freeze what survived and switch the collector off; then collect by hand
    every `collect_every` steps. Leaving the `with` block restores the normal collector (tests call trainers
    in-process)."""

    def __init__(self, collect_every=5000):
        self.collect_every = collect_every
        self.frozen = False

    def __enter__(self):
        return self

    def after_step(self, step):
        """`step`: optimizer steps done so far (resumed ones included)."""
        if not self.frozen:
            gc.collect()
            gc.freeze()
            gc.disable()
            self.frozen = True
        elif step % self.collect_every == 0:
            gc.collect()

    def __exit__(self, *exc):
        gc.unfreeze()
        gc.enable()


def mfu_percent(flops_per_token, tokens, dt, peak_flops, world_size):
    """Model FLOPs utilization in percent of the devices' peak; 0 where the peak is unknown (CPU, MPS)."""
    if not peak_flops:
        return 0.0
    return 100 * flops_per_token * tokens / dt / (peak_flops * world_size)


class StepMeter:
    """The numbers a trainer prints after each optimizer step: the loss as a debiased EMA, tok/s, MFU, the
    training time (without this process's first `untimed_steps`, which include compilation and warm-up) and
    the ETA. `smooth_loss` and `total_time` belong in the checkpoint for an exact resume."""

    def __init__(self, flops_per_token, runtime, smooth_loss=0.0, total_time=0.0, ema_beta=0.9, untimed_steps=10):
        self.flops_per_token, self.runtime = flops_per_token, runtime
        self.smooth_loss, self.total_time = smooth_loss, total_time
        self.ema_beta, self.untimed_steps = ema_beta, untimed_steps
        self.steps_this_run = self.timed_steps = 0
        self.timed_time = 0.0
        self.loss = self.dt = self.mfu = 0.0
        self.tok_per_sec = 0

    def update(self, loss, dt, tokens, steps_done):
        """One optimizer step: its mean loss, its seconds, the tokens it processed (all ranks), and the optimizer
        steps done so far including this one (the EMA's debiasing counts resumed steps too)."""
        self.smooth_loss = self.ema_beta * self.smooth_loss + (1 - self.ema_beta) * loss
        self.loss = self.smooth_loss / (1 - self.ema_beta ** steps_done)
        self.dt = dt
        self.tok_per_sec = int(tokens / dt)
        self.mfu = mfu_percent(self.flops_per_token, tokens, dt, self.runtime.peak_flops, self.runtime.world_size)
        self.steps_this_run += 1
        if self.steps_this_run > self.untimed_steps:
            self.total_time += dt
            self.timed_steps += 1
            self.timed_time += dt

    def eta(self, steps_left):
        """Seconds for `steps_left` more steps at this run's average timed step; None until a step was timed."""
        if self.timed_steps == 0:
            return None
        return steps_left * self.timed_time / self.timed_steps

    def line(self, counter, percent, lrm, epoch, eta, extra=None, mfu_label="mfu"):
        """`step <counter> (<percent>%) | loss | lrm | dt | tok/sec | <extra> | mfu | epoch | total time | eta`."""
        extra_text = "".join(f"{name}: {value} | " for name, value in (extra or {}).items())
        eta_text = f" | eta: {eta / 60:.1f}m" if eta is not None else ""
        return (f"step {counter} ({percent:.2f}%) | loss: {self.loss:.6f} | lrm: {lrm:.2f} | dt: {self.dt * 1000:.2f}ms | "
                f"tok/sec: {self.tok_per_sec:,} | {extra_text}{mfu_label}: {self.mfu:.2f} | epoch: {epoch} | "
                f"total time: {self.total_time / 60:.2f}m{eta_text}")

    def wandb_metrics(self):
        return {"train/loss": self.loss, "train/dt": self.dt, "train/tok_per_sec": self.tok_per_sec,
                "train/mfu": self.mfu}


# -----------------------------------------------------------------------------
# Divergence, saving and the end of a run

class NonFiniteLossError(UserError):
    """The training loss became NaN/inf. Exit status 3 (2 is a bad command)."""
    exit_code = 3


def check_finite_loss(loss_value, step):
    """Stop the run at the first NaN/inf step loss, before anything is saved. No grace steps: bf16 has fp32's
    exponent range and fp8 casts are scaled to each tensor's max, so a non-finite loss is not a rounding spike
    (fp16's overflowing gradients are skipped by its GradScaler, not seen here); and the step that produced it
    has already put NaN into the weights (Muon's orthogonalization spreads it through every matrix it
    touches), so every later loss would be NaN too. Finite loss spikes do not stop a run."""
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"the training loss is {loss_value} at step {step}: the run diverged, so it stops here without saving "
            f"(the checkpoints already saved are untouched). Lower the learning rates (e.g. halve them, or warm up "
            f"longer), then resume from the last good checkpoint with --resume-from-step")


def checkpoint_meta(step, val_bpb, model_config, user_config, device_batch_size, max_seq_len, total_batch_size,
                    tokenizer=None, **extra):
    """The meta fields nanochat's loaders and evals read, the fingerprint of the tokenizer the model trains with
    (default: $NANOCHAT_BASE_DIR/tokenizer, the one every trainer loads; loading the checkpoint with another one
    is refused), then the trainer's own (`extra`)."""
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    return {"step": step, "val_bpb": val_bpb, "model_config": model_config, "user_config": user_config,
            "device_batch_size": device_batch_size, "max_seq_len": max_seq_len, "total_batch_size": total_batch_size,
            "tokenizer_fingerprint": tokenizer.fingerprint(), **extra}


def fine_tuning_state(start, source_kind, step, num_steps, meter, **loop_extra):
    """The meta fields of a fine-tuning run's checkpoint (SFT, RL, DPO) that say where it started and where its loop
    stands (what a resume reads back), and the number of ranks, each of which saves an optimizer shard."""
    return {"source": {"kind": source_kind, "tag": start.source_tag, "step": start.source_step},
            "world_size": meter.runtime.world_size,
            "loop_state": {"step": step, "step_offset": start.step_offset, "num_steps": num_steps,
                           "smooth_train_loss": meter.smooth_loss, "total_training_time": meter.total_time,
                           **loop_extra}}


def is_save_step(step, start_step, save_every, last_step):
    """Save at the last step, and every save_every steps (when > 0) after the step the run started from (whose
    checkpoint is already on disk, or is step 0 of a fresh run)."""
    return last_step or (save_every > 0 and step > start_step and step % save_every == 0)


def save_run_checkpoint(start, step, model, optimizer, meta, rank, pusher):
    """Save this run's step (numbered after the source's when fine-tuning into its directory) into its output
    dir, then hand it to the background pusher."""
    number = start.step_offset + step
    save_checkpoint(start.output_dir, number, model.state_dict(), optimizer.state_dict(), meta, rank=rank)
    pusher.push(start.output_dir, number)


def check_run_can_save(checkpoint_dir, model, optimizer, runtime):
    """Before step 0, not at the first save hours later: room for one checkpoint in checkpoint_dir, and (rank 0,
    which writes it) a writable report."""
    check_can_save(checkpoint_dir, estimate_checkpoint_bytes(model, optimizer))
    if runtime.master:
        check_can_save(os.path.join(get_base_dir(), "report"), 2 ** 20)


def resumed_meter(loop_state, flops_per_token, runtime):
    """The step meter of a run, continuing a resumed one's smoothed loss and training time (loop_state: {} fresh)."""
    return StepMeter(flops_per_token, runtime, smooth_loss=loop_state.get("smooth_train_loss", 0.0),
                     total_time=loop_state.get("total_training_time", 0.0))


def run_to_the_end(make_run, push_wait):
    """A trainer's whole life: make_run() builds the run (setup), run.run() is its loop (saving and pushing along
    the way and at the end), run.finish() its summary, returned. Whatever happens, uploads still running get a
    bounded wait (run.pusher.close) and the process group is left."""
    run = None
    try:
        run = make_run()
        run.run()
        return run.finish()
    finally:
        if run is not None:
            run.pusher.close(push_wait)
        compute_cleanup()


def fine_tuning_summary(start, source_kind, step, meter, world_size):
    """Print where a fine-tuning run ended; returns its report rows (the trainer adds its own)."""
    number = start.step_offset + step
    print0(f"Total training time: {meter.total_time / 60:.2f}m")
    print0(f"Saved to {start.output_dir} (step {number})")
    return {"Source": f"{source_kind} {start.source_tag} step {start.source_step}",
            "Output": f"{start.output_dir} step {number}", "Number of iterations": step, "DDP world size": world_size,
            "Training time (min)": meter.total_time / 60}


def gather_from_ranks(obj, runtime):
    """[rank 0's obj, rank 1's, ...] on every rank (e.g. each rank's loader position, for an exact resume)."""
    if not runtime.ddp:
        return [obj]
    out = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def peak_memory_mib(device_type):
    """Peak CUDA memory allocated, else the process's peak RSS (Linux), in MiB."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 ** 2
    if resource is None:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
