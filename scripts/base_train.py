"""
Pretrain a base model. One integer, --depth, sizes the model and (through scaling laws) the training horizon,
the batch size, the learning rates and the weight decay. From the repo root:

    python -m scripts.base_train --depth=12
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --target-param-data-ratio=8

CPU / laptop (tiny model, offline data if there is no climbmix download):

    python -m scripts.base_train --depth=4 --max-seq-len=256 --device-batch-size=8 --total-batch-size=2048 \
        --window-pattern=L --eval-every=100 --eval-tokens=65536 --core-metric-every=-1 --num-iterations=500

Resume a run from its last checkpoint:   ... same flags ... --resume-from-step=last
Continued pretraining on new data into a new tag (weights only, fresh optimizer and schedule):
    python -m scripts.base_train --init-from=d12 --data-dir=my_corpus/ --num-iterations=1000 --model-tag=d12_cpt
Context extension (2K -> 8K; the RoPE base is scaled NTK-style unless --rope-base is given):
    python -m scripts.base_train --init-from=d12 --max-seq-len=8192 --device-batch-size=4 --num-iterations=200
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import gc
import sys
import json
import math
import time
import argparse
from dataclasses import asdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, DummyWandb, get_base_dir, autodetect_device_type,
                             get_peak_flops, COMPUTE_DTYPE, warn_if_cpu_is_busy)
from nanochat.checkpoint_manager import (save_checkpoint, load_checkpoint, find_last_step, patch_model_config,
                                         patch_state_dict, meta_path)
from nanochat import chunked_loss
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import optimizer_step, set_schedule

B_REF = 2 ** 19          # optimal total batch size (tokens) measured at d12, the reference depth
DEFAULT_ROPE_BASE = 100000.0


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(description="Pretrain a base model (the whole recipe follows from --depth)")
    # Logging / runtime
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    # FP8 training
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls for the big Linears (CUDA H100+ only; ignored elsewhere)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"],
                        help="FP8 scaling recipe: tensorwise (faster, recommended) or rowwise")
    # Model architecture
    parser.add_argument("--depth", type=int, default=20, help="number of transformer layers; sizes everything else")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of --head-dim)")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--window-pattern", type=str, default="SSSL",
                        help="attention windows tiled over layers: L = full context, S = a quarter of it (rounded up to 128); last layer is always L")
    parser.add_argument("--rope-base", type=float, default=None,
                        help=f"RoPE base theta (default {DEFAULT_ROPE_BASE:.0f}; with --init-from and a longer --max-seq-len: the source's base scaled NTK-style)")
    # Training horizon (only one used, in order of precedence)
    parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimization steps (-1 = disable; 0 = no steps, just evaluate/save the initial model)")
    parser.add_argument("--target-flops", type=float, default=-1.0, help="train until this many FLOPs (-1 = disable)")
    parser.add_argument("--target-param-data-ratio", type=float, default=12,
                        help="train for ratio * scaling params tokens (Chinchilla = 20; -1 = disable)")
    # Optimization
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step; lower it (16, 8, ...) if you run out of memory")
    parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step, all ranks (-1 = scaling-law optimum, a power of 2)")
    parser.add_argument("--embedding-lr", type=float, default=0.3, help="learning rate for the embedding tables (AdamW)")
    parser.add_argument("--unembedding-lr", type=float, default=0.008, help="learning rate for lm_head (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.28, help="cautious weight decay for the Muon matrices (at d12; scaled with depth)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="learning rate for the matrices (Muon)")
    parser.add_argument("--scalar-lr", type=float, default=0.5, help="learning rate for the per-layer scalars (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=40, help="steps of linear LR warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of the steps spent in linear LR warmdown")
    parser.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end as a fraction of the peak LR")
    parser.add_argument("--resume-from-step", type=str, default="-1",
                        help="resume from this step's checkpoint of --model-tag ('last' = the latest; -1 = start fresh)")
    # Evaluation
    parser.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = disable)")
    parser.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens to evaluate val bpb on")
    parser.add_argument("--core-metric-every", type=int, default=2000, help="evaluate the CORE metric every N steps (-1 = disable)")
    parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per task for the CORE metric (-1 = all)")
    parser.add_argument("--sample-every", type=int, default=2000, help="print greedy samples every N steps (-1 = disable)")
    parser.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    # Data / output / extras
    parser.add_argument("--data-dir", type=str, default=None, help="folder of parquet (text column) / jsonl / txt to train on (default: climbmix, else the offline corpus)")
    parser.add_argument("--synthetic-data", action="store_true",
                        help="random tokens instead of text (benchmarks/tests: every world size sees the same global batches)")
    parser.add_argument("--init-from", type=str, default=None,
                        help="TAG[:STEP] of a base checkpoint to continue pretraining from (weights only; new tag, fresh optimizer and schedule)")
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1 = yes, 0 = no, -1 = auto (CUDA, and CPU when a C++ compiler is installed)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>, or <source>_cpt with --init-from)")
    return parser


def explicit_flags(parser, argv):
    """Destinations of the flags the user actually typed (so defaults can come from elsewhere, e.g. --init-from)."""
    out = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                out.add(action.dest)
    return out


# -----------------------------------------------------------------------------
# The depth dial: model shape, horizon, batch size, LR and WD scaling (pure functions, tested against the
# reference's numbers)

def model_config_for_depth(depth, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern, rope_base=DEFAULT_ROPE_BASE):
    from nanochat.gpt import GPTConfig
    # model_dim rounded up to a multiple of head_dim, so every head is exactly head_dim wide
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern, rope_base=rope_base)


def build_meta_model(config):
    """The model on the meta device: shapes and counts only, no memory."""
    from nanochat.gpt import GPT
    with torch.device("meta"):
        return GPT(config)


def plan_training(num_iterations, target_flops, target_param_data_ratio, total_batch_size, weight_decay,
                  scaling_params, d12_scaling_params, flops_per_token):
    """Horizon, batch size, LR multiplier and Muon weight decay from the scaling-law rules.
    - tokens target = ratio * scaling params; the d12 reference horizon D_REF uses the same ratio
    - batch (when -1): B_REF * (D / D_REF)^0.383 rounded to a power of 2 (Power Lines, arXiv 2505.13738)
    - all LRs x sqrt(B / B_REF); Muon WD x sqrt(B / B_REF) * D_REF / D (T_epoch, arXiv 2405.13698)
    - iterations: --num-iterations (>= 0) > --target-flops > --target-param-data-ratio (first enabled wins)"""
    if num_iterations < 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        raise ValueError("No training horizon: pass one of --num-iterations, --target-flops or --target-param-data-ratio")
    # The ratio cancels in the batch and WD formulas, so a disabled ratio (-1) still gives the reference numbers.
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else 12
    target_tokens = int(ratio * scaling_params)
    d_ref = ratio * d12_scaling_params
    if total_batch_size == -1:
        predicted = B_REF * (target_tokens / d_ref) ** 0.383
        total_batch_size = 2 ** round(math.log2(predicted))
        batch_auto = True
    else:
        batch_auto = False
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    weight_decay_scaled = weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens)
    if num_iterations >= 0:
        horizon_source = "--num-iterations"
    elif target_flops > 0:
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
        horizon_source = "--target-flops"
    else:
        num_iterations = target_tokens // total_batch_size
        horizon_source = "--target-param-data-ratio"
    return dict(num_iterations=num_iterations, horizon_source=horizon_source, total_batch_size=total_batch_size,
                batch_auto=batch_auto, target_tokens=target_tokens, batch_lr_scale=batch_lr_scale,
                weight_decay_scaled=weight_decay_scaled)


def compute_grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size):
    """Micro-steps per optimizer step; the total batch must be an exact multiple of one micro-step on all ranks."""
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step == 0 and total_batch_size >= per_step:
        return total_batch_size // per_step
    lower = max(per_step, total_batch_size // per_step * per_step)
    upper = lower + per_step if lower < total_batch_size else lower
    ok_device_bs = [b for b in range(1, device_batch_size * 4 + 1) if total_batch_size % (b * max_seq_len * world_size) == 0]
    hint = (f" or a --device-batch-size that divides it: {ok_device_bs[-6:]}" if ok_device_bs else
            f" (no --device-batch-size works with --max-seq-len {max_seq_len} on {world_size} rank(s))")
    raise ValueError(
        f"Total batch size {total_batch_size:,} tokens is not a multiple of one micro-step over all ranks: "
        f"--device-batch-size {device_batch_size} x --max-seq-len {max_seq_len} x {world_size} rank(s) = {per_step:,} tokens. "
        f"Set --total-batch-size to a multiple of {per_step:,} (e.g. {lower:,} or {upper:,}){hint}.")


# Schedules (step -> value), exactly nanochat's.

def lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, flat, linear warmdown over the last warmdown_ratio of the run to final_lr_frac."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, num_iterations, warmdown_ratio):
    """0.85 -> 0.97 over the first 400 steps, flat, then 0.97 -> 0.90 during the LR warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(it, num_iterations, weight_decay_scaled):
    """Cosine from the scaled value to zero over the run."""
    return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def ntk_rope_base(source_base, source_len, target_len, head_dim):
    """NTK-aware RoPE scaling for context extension: base * s^(d/(d-2)) with s = target_len / source_len, which
    keeps the lowest frequency's wavelength in step with the longer context while barely moving the high ones."""
    s = target_len / source_len
    return source_base * s ** (head_dim / (head_dim - 2))


# -----------------------------------------------------------------------------
# Data

def synthetic_loader(vocab_size, B, T, device, rank, world_size, seed_offset=0, resume_state_dict=None):
    """Random-token batches. Global micro-batch g goes to rank g % world_size, so any world size (with the
    matching grad accumulation) sees the same global batches. Yields (x, y, state) like the real loader; the
    state names rank 0's batch, from which every rank can resume."""
    g = rank
    if isinstance(resume_state_dict, (list, tuple)):  # every rank's state: they all name the same global batch
        resume_state_dict = resume_state_dict[0]
    if resume_state_dict is not None:
        g = resume_state_dict["synthetic_batch"] + world_size + rank
    while True:
        gen = torch.Generator().manual_seed(seed_offset + g)
        tokens = torch.randint(0, vocab_size, (B, T + 1), generator=gen)
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        yield x, y, {"synthetic_batch": g - rank}
        g += world_size


def describe_loader_state(state):
    if not state:
        return "-"
    if "synthetic_batch" in state:
        return f"synthetic {state['synthetic_batch']}"
    parts = [str(state.get("epoch", "?"))] + [f"{k.split('_')[0]}: {state[k]}" for k in ("pq_idx", "rg_idx") if k in state]
    return " ".join(parts)


# -----------------------------------------------------------------------------
# FP8 (CUDA only): convert the big Linears, and switch back to bf16 for evaluation

def convert_fp8(model, recipe):
    try:
        from nanochat.fp8 import Float8LinearConfig, convert_to_float8_training
        if recipe != "tensorwise":  # our module implements tensorwise only; torchao has rowwise
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        if recipe != "tensorwise":
            raise SystemExit(f"--fp8-recipe {recipe} needs torchao (pip install torchao); "
                             f"nanochat's built-in fp8 supports --fp8-recipe tensorwise")
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError:
            print0("WARNING: --fp8 needs nanochat.fp8 or torchao (pip install torchao); training in bf16 instead")
            return
    import torch.nn as nn

    def fp8_filter(mod, fqn):  # fp8 GEMMs want dims divisible by 16 and big enough to pay off
        return (isinstance(mod, nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                and min(mod.in_features, mod.out_features) >= 128)
    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=fp8_filter)
    num_fp8 = sum("Float8" in type(m).__name__ for m in model.modules())
    print0(f"FP8 training ({recipe}): converted {num_fp8}/{num_linear} Linear layers")


@contextmanager
def disable_fp8(model):
    """Temporarily swap Float8Linear modules for plain Linears sharing the same weights (bf16 evaluation)."""
    from nanochat.gpt import Linear
    swapped = []
    for name, module in list(model.named_modules()):
        if "Float8" in type(module).__name__:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = module.weight
            setattr(parent, attr, linear)
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def should_compile(flag, device_type):
    """--compile: 1 yes, 0 no, -1 auto = CUDA, or CPU when a C++ compiler is there for inductor (measured on a
    2-core AVX2 EPYC: ~1.2-1.3x faster steps and ~half the memory at d4-d6, after ~1 min of compilation)."""
    if flag != -1:
        return flag == 1
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        import shutil
        if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return True
        print0("NOTE: no C++ compiler found, so torch.compile is off on CPU (install g++/clang for ~1.25x faster steps)")
    return False


def warm_up_compiled(model, orig_model, x, y):
    """Compile now, on one forward/backward of the first batch (gradients discarded, no data consumed), so a
    compiler problem falls back to eager with a warning instead of killing the run later."""
    t0 = time.time()
    try:
        model(x, y).backward()
    except Exception as e:
        print0(f"WARNING: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
               f"training uncompiled (pass --compile 0 to skip the attempt)")
        model = orig_model
        chunked_loss.COMPILE_ELEMENTWISE = False
    orig_model.zero_grad(set_to_none=True)
    print0(f"Compilation warm-up: {time.time() - t0:.1f}s")
    return model


def peak_memory_mib(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 ** 2
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)
    except ImportError:
        return 0.0


# -----------------------------------------------------------------------------
# Training

def train(args, explicit=frozenset()):
    """Run pretraining. Returns a dict (per-step losses, val bpb, checkpoint dir, ...) for callers and tests."""
    user_config = vars(args).copy()
    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master_process = rank == 0
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    if device_type == "cuda":
        gpu_name = torch.cuda.get_device_name(0)
        peak_flops = get_peak_flops(gpu_name)
        print0(f"GPU: {gpu_name} | peak bf16 FLOP/s: {peak_flops:.2e}" + ("" if peak_flops else " (unknown GPU: MFU reads 0)"))
    else:
        peak_flops = 0.0  # MFU is not meaningful on CPU/MPS; reported as 0
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} | device: {device} | world size: {world_size}")
    if device_type == "cpu":
        warn_if_cpu_is_busy()

    # wandb, only on rank 0 and only when asked for
    if args.run == "dummy" or not master_process:
        wandb_run = DummyWandb()
    else:
        try:
            import wandb
        except ImportError:
            raise SystemExit("--run was given but wandb is not installed: pip install wandb, or pass --run dummy")
        wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)

    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")
    base_dir = get_base_dir()

    # --- resume step and source checkpoint (continued pretraining) ---
    resume_step = args.resume_from_step
    init_src = None
    if args.init_from:
        src_tag, _, src_step = args.init_from.partition(":")
        src_dir = os.path.join(base_dir, "base_checkpoints", src_tag)
        src_step = int(src_step) if src_step else find_last_step(src_dir)
        with open(meta_path(src_dir, src_step), encoding="utf-8") as f:
            src_meta = json.load(f)
        init_src = dict(tag=src_tag, dir=src_dir, step=src_step, config=patch_model_config(src_meta["model_config"]))
    model_tag = args.model_tag or (f"{init_src['tag']}_cpt" if init_src else f"d{args.depth}")
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", model_tag)
    if resume_step == "last":
        resume_step = find_last_step(checkpoint_dir)
    resume_step = int(resume_step)
    resuming = resume_step != -1

    # --- model config: from --depth, or from the source checkpoint when continuing pretraining ---
    if init_src is None:
        rope_base = args.rope_base or DEFAULT_ROPE_BASE
        config = model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, vocab_size,
                                        args.window_pattern, rope_base)
    else:
        config = config_for_init_from(args, explicit, init_src, vocab_size)
        args.depth = user_config["depth"] = config.n_layer  # the shape came from the source checkpoint
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    model_config_kwargs = asdict(config)
    print0(f"Model config:\n{json.dumps(model_config_kwargs, indent=2)}")
    from nanochat.attention import HAS_FA3
    if device_type == "cuda" and HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16:
        print0("Using Flash Attention 3 (Hopper)")
    elif "S" in config.window_pattern.upper():
        print0(f"WARNING: no Flash Attention 3 here, so attention runs on PyTorch SDPA, which cannot skip the masked-out "
               f"part of sliding windows: window pattern {config.window_pattern} costs full-context compute plus a mask. "
               f"Recommend --window-pattern L.")
    model.to_empty(device=device)
    model.init_weights()

    meta_data = None
    if resuming:
        print0(f"Resuming from step {resume_step} of {checkpoint_dir}")
        model_data, optimizer_data, meta_data = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
        check_resume_compatible(meta_data, model_config_kwargs, user_config, world_size)
        model.load_state_dict(patch_state_dict(model_data, model), strict=True, assign=True)
        del model_data
    elif init_src is not None:
        print0(f"Initializing weights from {init_src['dir']} step {init_src['step']}")
        model_data, _, _ = load_checkpoint(init_src["dir"], init_src["step"], device)
        model.load_state_dict(patch_state_dict(model_data, model), strict=True, assign=True)
        del model_data

    if args.fp8:
        if device_type != "cuda":
            print0("WARNING: --fp8 needs a CUDA GPU; ignoring it")
        else:
            convert_fp8(model, args.fp8_recipe)

    orig_model = model  # uncompiled: saving, sampling and CORE (whose shapes vary)
    use_compile = should_compile(args.compile, device_type)
    if use_compile:
        model = torch.compile(model, dynamic=False)  # input shapes never change during training
        chunked_loss.COMPILE_ELEMENTWISE = True  # the CPU loss's per-chunk kernel too (unused on GPUs)

    # --- scaling laws: horizon, batch, LR and WD ---
    param_counts = orig_model.num_params_by_group()
    print0("Parameter counts:")
    for key, value in param_counts.items():
        print0(f"{key:24s}: {value:,}")
    num_flops_per_token = orig_model.estimate_flops()
    print0(f"Estimated FLOPs per token: {num_flops_per_token:e}")
    num_scaling_params = orig_model.num_scaling_params()
    d12_ref = build_meta_model(model_config_for_depth(12, args.aspect_ratio, args.head_dim, config.sequence_len,
                                                      vocab_size, config.window_pattern))
    plan = plan_training(args.num_iterations, args.target_flops, args.target_param_data_ratio, args.total_batch_size,
                         args.weight_decay, num_scaling_params, d12_ref.num_scaling_params(), num_flops_per_token)
    del d12_ref
    num_iterations, total_batch_size = plan["num_iterations"], plan["total_batch_size"]
    batch_lr_scale, weight_decay_scaled = plan["batch_lr_scale"], plan["weight_decay_scaled"]
    if plan["batch_auto"]:
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
    if batch_lr_scale != 1.0:
        print0(f"Scaling LRs by {batch_lr_scale:.4f} for batch size {total_batch_size:,} (reference: {B_REF:,})")
    if weight_decay_scaled != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay_scaled:.6f} for depth {config.n_layer}")
    print0(f"Number of iterations from {plan['horizon_source']}: {num_iterations:,}")
    if init_src is not None and plan["horizon_source"] == "--target-param-data-ratio":
        print0("NOTE: continued pretraining with the from-scratch horizon; pass --num-iterations for a shorter phase")
    total_tokens = total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {num_flops_per_token * total_tokens:e}")
    grad_accum_steps = compute_grad_accum_steps(total_batch_size, args.device_batch_size, config.sequence_len, world_size)
    tokens_per_fwdbwd = args.device_batch_size * config.sequence_len
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {config.sequence_len} = {tokens_per_fwdbwd:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")

    optimizer = orig_model.setup_optimizer(unembedding_lr=args.unembedding_lr * batch_lr_scale,
                                           embedding_lr=args.embedding_lr * batch_lr_scale,
                                           scalar_lr=args.scalar_lr * batch_lr_scale,
                                           matrix_lr=args.matrix_lr * batch_lr_scale,
                                           weight_decay=weight_decay_scaled)
    if resuming:
        optimizer.load_state_dict(optimizer_data)
        del optimizer_data
    scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None

    # --- data ---
    B, T = args.device_batch_size, config.sequence_len
    # multi-rank runs save every rank's loader state (the loader picks its own); nanochat's meta has rank 0's only
    loader_resume = (meta_data.get("dataloader_state_dicts") or meta_data["dataloader_state_dict"]) if resuming else None
    if args.synthetic_data:
        train_loader = synthetic_loader(vocab_size, B, T, device, rank, world_size, resume_state_dict=loader_resume)
        build_val_loader = lambda: synthetic_loader(vocab_size, B, T, device, rank, world_size, seed_offset=10 ** 9)
    else:
        from nanochat.dataloader import (tokenizing_distributed_data_loader_with_state_bos_bestfit,
                                         tokenizing_distributed_data_loader_bos_bestfit)
        train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
            tokenizer, B, T, split="train", device=device, resume_state_dict=loader_resume, data_dir=args.data_dir)
        build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(
            tokenizer, B, T, split="val", device=device, data_dir=args.data_dir)
    x, y, loader_state = next(train_loader)
    # loader state after the last batch actually trained on (what resume needs; the prefetched batch is not in it)
    consumed_state = loader_resume[rank] if isinstance(loader_resume, list) else loader_resume
    if use_compile:
        model = warm_up_compiled(model, orig_model, x, y)

    schedule = dict(num_iterations=num_iterations, warmup_steps=args.warmup_steps, warmdown_ratio=args.warmdown_ratio,
                    final_lr_frac=args.final_lr_frac)

    # --- loop state ---
    if resuming:
        step = meta_data["step"]
        val_bpb = meta_data["val_bpb"]
        loop_state = meta_data["loop_state"]
        min_val_bpb = loop_state["min_val_bpb"]
        smooth_train_loss = loop_state["smooth_train_loss"]
        total_training_time = loop_state["total_training_time"]
    else:
        step, val_bpb, min_val_bpb, smooth_train_loss, total_training_time = 0, None, float("inf"), 0.0, 0.0
    try:
        from nanochat.core_eval import evaluate_core
    except ImportError:
        evaluate_core = None
    core_results = {}
    losses, val_curve, mfu, dt = {}, [], 0.0, 0.0

    while True:
        last_step = step == num_iterations  # one extra pass so the end of the run is evaluated and saved
        flops_so_far = num_flops_per_token * total_batch_size * step

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            eval_steps = max(1, args.eval_tokens // (B * T * world_size))
            with disable_fp8(model):
                val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            min_val_bpb = min(min_val_bpb, val_bpb)
            val_curve.append((step, val_bpb))
            wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                           "total_training_time": total_training_time, "val/bpb": val_bpb})
            model.train()

        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            if evaluate_core is None:
                print0("NOTE: nanochat.core_eval is not available; skipping the CORE metric")
            else:
                model.eval()
                try:
                    with disable_fp8(orig_model):
                        core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
                    print0(f"Step {step:05d} | CORE metric: {core_results['core_metric']:.4f}")
                    wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                                   "core_metric": core_results["core_metric"],
                                   "centered_results": core_results["centered_results"]})
                except Exception as e:  # a missing eval bundle must not kill hours of training
                    print0(f"WARNING: CORE evaluation failed ({type(e).__name__}: {e}); training continues")
                model.train()

        if args.sample_every > 0 and master_process and (last_step or (step > 0 and step % args.sample_every == 0)):
            from scripts.base_eval import SAMPLE_PROMPTS, greedy_samples
            orig_model.eval()
            with disable_fp8(orig_model):
                for text in greedy_samples(orig_model, tokenizer, SAMPLE_PROMPTS, max_tokens=16):
                    print0(text)
            orig_model.train()

        if last_step or (step > 0 and step != resume_step and args.save_every > 0 and step % args.save_every == 0):
            all_loader_states = None
            if ddp:  # each rank reads its own stripe: keep every rank's position for an exact resume
                all_loader_states = [None] * world_size
                dist.all_gather_object(all_loader_states, consumed_state)
            save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.state_dict(), {
                "step": step,
                "val_bpb": val_bpb,
                "model_config": model_config_kwargs,
                "user_config": user_config,
                "device_batch_size": B,
                "max_seq_len": T,
                "total_batch_size": total_batch_size,
                "dataloader_state_dict": all_loader_states[0] if ddp else consumed_state,  # rank 0's, as nanochat
                "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
                               "total_training_time": total_training_time},
                # ours, beyond nanochat's fields
                "num_iterations": num_iterations,
                "world_size": world_size,
                "dataloader_state_dicts": all_loader_states,
                "rope_base": config.rope_base,
                "init_from": None if init_src is None else f"{init_src['tag']}:{init_src['step']}",
                "core_metric": core_results.get("core_metric"),
            }, rank=rank)

        if last_step:
            break

        # ---- one optimization step ----
        synchronize()
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            loss = model(x, y)
            loss_sum += loss.detach()
            loss = loss / grad_accum_steps  # each backward() sums gradients: normalize here
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            consumed_state = loader_state
            x, y, loader_state = next(train_loader)  # prefetch while the device works
        lrm = lr_multiplier(step, **schedule)
        momentum = muon_momentum(step, num_iterations, args.warmdown_ratio)
        wd = muon_weight_decay(step, num_iterations, weight_decay_scaled)
        set_schedule(optimizer, lrm, momentum, wd)
        optimizer_step(optimizer, scaler, ddp)
        model.zero_grad(set_to_none=True)
        # the loss of the whole batch: mean over micro-steps and ranks (one tiny all-reduce)
        train_loss = loss_sum / grad_accum_steps
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            train_loss /= world_size
        train_loss_f = train_loss.item()
        synchronize()
        dt = time.time() - t0

        # ---- logging ----
        losses[step] = train_loss_f
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(total_batch_size / dt)
        mfu = 100 * num_flops_per_token * total_batch_size / dt / (peak_flops * world_size) if peak_flops else 0.0
        if step > 10:
            total_training_time += dt  # the first steps include compilation/warmup
        steps_timed = step - 10
        eta = f" | eta: {(num_iterations - step) * total_training_time / steps_timed / 60:.1f}m" if steps_timed > 0 else ""
        epoch = describe_loader_state(consumed_state)
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {debiased_loss:.6f} | "
               f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | bf16_mfu: {mfu:.2f} | "
               f"epoch: {epoch} | total time: {total_training_time / 60:.2f}m{eta}")
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                           "train/loss": debiased_loss, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/epoch": epoch})

        first_step_of_run = step == 0 or step == resume_step
        step += 1
        # The cyclic GC spends ~0.5 s per scan on the many long-lived setup objects: collect once, freeze them,
        # and collect by hand every 5000 steps.
        if first_step_of_run:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    gc.enable()
    gc.unfreeze()
    peak_mem = peak_memory_mib(device_type)
    print0(f"Peak memory usage: {peak_mem:.2f}MiB")
    print0(f"Total training time: {total_training_time / 60:.2f}m")
    if val_bpb is not None:
        print0(f"Minimum validation bpb: {min_val_bpb:.6f}")

    if master_process:
        log_report(user_config, dict(
            num_params=param_counts["total"], num_scaling_params=num_scaling_params, flops_per_token=num_flops_per_token,
            num_iterations=num_iterations, total_tokens=total_tokens, total_batch_size=total_batch_size,
            grad_accum_steps=grad_accum_steps, world_size=world_size, weight_decay_scaled=weight_decay_scaled,
            batch_lr_scale=batch_lr_scale, min_val_bpb=min_val_bpb if val_bpb is not None else None,
            final_val_bpb=val_bpb, core_metric=core_results.get("core_metric"), mfu=mfu,
            total_training_time=total_training_time, peak_mem=peak_mem, init_from=args.init_from,
            max_seq_len=T, rope_base=config.rope_base), losses, val_curve)
    wandb_run.finish()
    return dict(losses=losses, val_bpb=val_bpb, min_val_bpb=min_val_bpb, num_iterations=num_iterations,
                total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps, checkpoint_dir=checkpoint_dir,
                model_config=model_config_kwargs, core_metric=core_results.get("core_metric"), val_bpb_curve=val_curve)


def config_for_init_from(args, explicit, init_src, vocab_size):
    """Continued pretraining: the architecture comes from the source checkpoint; --max-seq-len (context
    extension), --window-pattern and --rope-base may change, shape flags must agree if given."""
    from nanochat.gpt import GPTConfig
    src = init_src["config"]
    if src["vocab_size"] != vocab_size:
        raise ValueError(f"--init-from {init_src['tag']} was trained with vocab_size={src['vocab_size']} but the current "
                         f"tokenizer has {vocab_size} tokens: continued pretraining needs the source's tokenizer.")
    shape_flags = {"depth", "aspect_ratio", "head_dim"} & explicit
    if shape_flags:
        implied = model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, 1, vocab_size, "L")
        got = (implied.n_layer, implied.n_embd, implied.n_head)
        want = (src["n_layer"], src["n_embd"], src["n_head"])
        if got != want:
            raise ValueError(f"--init-from {init_src['tag']} has n_layer={want[0]}, n_embd={want[1]}, n_head={want[2]} but "
                             f"{', '.join('--' + f.replace('_', '-') for f in sorted(shape_flags))} imply "
                             f"n_layer={got[0]}, n_embd={got[1]}, n_head={got[2]}. Drop those flags: the shape comes from the source.")
    seq_len = args.max_seq_len if "max_seq_len" in explicit else src["sequence_len"]
    window_pattern = args.window_pattern if "window_pattern" in explicit else src["window_pattern"]
    src_rope = src.get("rope_base", DEFAULT_ROPE_BASE)
    head_dim = src["n_embd"] // src["n_head"]
    if args.rope_base:
        rope_base = args.rope_base
    elif seq_len > src["sequence_len"]:
        rope_base = ntk_rope_base(src_rope, src["sequence_len"], seq_len, head_dim)
        print0(f"Context extension {src['sequence_len']} -> {seq_len}: RoPE base {src_rope:.0f} -> {rope_base:.0f} "
               f"(NTK-aware, x{seq_len / src['sequence_len']:g}^({head_dim}/{head_dim - 2})); pass --rope-base to override")
    else:
        rope_base = src_rope
    config = GPTConfig(**{**src, "sequence_len": seq_len, "window_pattern": window_pattern, "rope_base": rope_base})
    if seq_len != src["sequence_len"] and "S" in window_pattern.upper():
        from nanochat.gpt import compute_window_sizes
        old_w = min(compute_window_sizes(GPTConfig(**{**src, "window_pattern": window_pattern})))
        new_w = min(compute_window_sizes(config))
        print0(f"NOTE: window pattern {window_pattern}: short-window layers now see {new_w} tokens (the source was trained "
               f"with {old_w}); long-range information still flows only through the L layers. --window-pattern L "
               f"gives every layer the full {seq_len}-token context.")
    return config


def check_resume_compatible(meta, model_config_kwargs, user_config, world_size):
    saved = patch_model_config(meta["model_config"])
    diff = {k: (saved.get(k), v) for k, v in model_config_kwargs.items() if k in saved and saved[k] != v}
    if diff:
        raise ValueError(f"Cannot resume: the checkpoint's model config differs from these flags' ({diff}, as "
                         f"checkpoint vs now). Resume with the same architecture flags as the original run.")
    saved_world = meta.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise ValueError(f"Cannot resume: the checkpoint was saved by {saved_world} rank(s) (optimizer state is sharded "
                         f"per rank) but this run has {world_size}. Use torchrun --nproc_per_node={saved_world}.")
    ignore = {"resume_from_step", "run"}
    changed = {k: (meta["user_config"].get(k), v) for k, v in user_config.items()
               if k not in ignore and k in meta.get("user_config", {}) and meta["user_config"][k] != v}
    if changed:
        print0(f"WARNING: flags differ from the original run (original vs now): {changed}")


def log_report(user_config, stats, losses, val_curve):
    try:
        from nanochat.report import get_report
    except ImportError:
        return
    report = get_report()
    report.log(section="Base model training", data=[user_config, {
        "Number of parameters": stats["num_params"],
        "Number of scaling parameters": stats["num_scaling_params"],
        "Number of FLOPs per token": f"{stats['flops_per_token']:e}",
        "Calculated number of iterations": stats["num_iterations"],
        "Number of training tokens": stats["total_tokens"],
        "Tokens : Scaling params ratio": stats["total_tokens"] / stats["num_scaling_params"],
        "Total batch size": stats["total_batch_size"],
        "Gradient accumulation steps": stats["grad_accum_steps"],
        "DDP world size": stats["world_size"],
        "LR scale (batch)": stats["batch_lr_scale"],
        "Muon weight decay (scaled)": stats["weight_decay_scaled"],
        "Context length": stats["max_seq_len"],
        "RoPE base": stats["rope_base"],
        "Initialized from": stats["init_from"] or "scratch",
        "Minimum validation bpb": stats["min_val_bpb"],
        "Final validation bpb": stats["final_val_bpb"],
        "CORE metric estimate": stats["core_metric"],
        "MFU %": f"{stats['mfu']:.2f}%",
        "Total training flops": f"{stats['flops_per_token'] * stats['total_tokens']:e}",
        "Total training time": f"{stats['total_training_time'] / 60:.2f}m",
        "Peak memory usage": f"{stats['peak_mem']:.2f}MiB",
    }])
    if losses:
        report.log_series("train loss", list(losses.keys()), list(losses.values()), section="Base model training")
    if val_curve:
        report.log_series("val bpb", [s for s, _ in val_curve], [v for _, v in val_curve], section="Base model training")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume_from_step != "last":
        try:
            args.resume_from_step = int(args.resume_from_step)  # an int in user_config, as nanochat writes it
        except ValueError:
            parser.error(f"--resume-from-step must be a step number, -1 or 'last', got {args.resume_from_step!r}")
    try:
        return train(args, explicit=explicit_flags(parser, argv))
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
