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

import argparse
import os
import sys

from nanochat.cli import (add_run_arguments, ArgumentParser, existing_dir, exit_on_user_error, float_above,
                          float_at_least, fraction, int_at_least, UserError, window_pattern)
from nanochat.remote import add_push_arguments


# -----------------------------------------------------------------------------
# Command line: every flag is checked as it is parsed, before torch and the rest are imported below

def step_or_last(text):
    """--resume-from-step: a step number (an int in user_config, as nanochat writes it), -1 or 'last'."""
    if text == "last":
        return text
    try:
        step = int(text)
    except ValueError:
        step = -2
    if step < -1:
        raise argparse.ArgumentTypeError(f"must be a step number, -1 or 'last', got {text!r}")
    return step


def build_parser():
    parser = ArgumentParser(description="Pretrain a base model (the whole recipe follows from --depth)")
    # Logging / runtime
    add_run_arguments(parser)
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the weight init (42, nanochat's, keeps runs bit-identical; vary it to compare recipes)")
    # FP8 training
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls for the big Linears (CUDA H100+ only; ignored elsewhere)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"],
                        help="FP8 scaling recipe: tensorwise (faster, recommended) or rowwise")
    # Model architecture
    parser.add_argument("--depth", type=int_at_least(1), default=20, help="number of transformer layers; sizes everything else")
    parser.add_argument("--aspect-ratio", type=int_at_least(1), default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of --head-dim)")
    parser.add_argument("--head-dim", type=int_at_least(2, multiple_of=2), default=128,
                        help="attention head dimension (even: rotary embeddings pair its channels)")
    parser.add_argument("--max-seq-len", type=int_at_least(1), default=2048, help="context length in tokens")
    parser.add_argument("--window-pattern", type=window_pattern, default="SSSL",
                        help="attention windows tiled over layers: L = full context, S = a quarter of it (rounded up to 128); last layer is always L")
    parser.add_argument("--rope-base", type=float_above(0), default=None,
                        help="RoPE base theta (default: GPTConfig's, 100000; with --init-from and a longer --max-seq-len: the source's base scaled NTK-style)")
    # Training horizon (only one used, in order of precedence)
    parser.add_argument("--num-iterations", type=int_at_least(0, off=-1), default=-1, help="explicit number of optimization steps (-1 = disable; 0 = no steps, just evaluate/save the initial model)")
    parser.add_argument("--target-flops", type=float_above(0, off=-1), default=-1.0, help="train until this many FLOPs (-1 = disable)")
    parser.add_argument("--target-param-data-ratio", type=float_above(0, off=-1), default=12,
                        help="train for ratio * scaling params tokens (Chinchilla = 20; -1 = disable)")
    # Optimization
    parser.add_argument("--device-batch-size", type=int_at_least(1), default=32, help="sequences per device per micro-step; lower it (16, 8, ...) if you run out of memory")
    parser.add_argument("--total-batch-size", type=int_at_least(1, off=-1), default=-1, help="tokens per optimizer step, all ranks (-1 = scaling-law optimum, a power of 2)")
    parser.add_argument("--embedding-lr", type=float_at_least(0), default=0.3, help="learning rate for the embedding tables (AdamW)")
    parser.add_argument("--unembedding-lr", type=float_at_least(0), default=0.008, help="learning rate for lm_head (AdamW)")
    parser.add_argument("--weight-decay", type=float_at_least(0), default=0.28, help="cautious weight decay for the Muon matrices (at d12; scaled with depth)")
    parser.add_argument("--matrix-lr", type=float_at_least(0), default=0.02, help="learning rate for the matrices (Muon)")
    parser.add_argument("--scalar-lr", type=float_at_least(0), default=0.5, help="learning rate for the per-layer scalars (AdamW)")
    parser.add_argument("--warmup-steps", type=int_at_least(0), default=40, help="steps of linear LR warmup")
    parser.add_argument("--warmdown-ratio", type=fraction, default=0.65, help="fraction of the steps spent in linear LR warmdown")
    parser.add_argument("--final-lr-frac", type=fraction, default=0.05, help="LR at the end as a fraction of the peak LR")
    parser.add_argument("--resume-from-step", type=step_or_last, default="-1",
                        help="resume from this step's checkpoint of --model-tag ('last' = the latest; -1 = start fresh)")
    # Evaluation
    parser.add_argument("--eval-every", type=int_at_least(0, off=-1), default=250, help="evaluate val bpb every N steps (-1 = disable)")
    parser.add_argument("--eval-tokens", type=int_at_least(1), default=80 * 524288, help="tokens to evaluate val bpb on")
    parser.add_argument("--core-metric-every", type=int_at_least(0, off=-1), default=2000, help="evaluate the CORE metric every N steps (-1 = disable)")
    parser.add_argument("--core-metric-max-per-task", type=int_at_least(1, off=-1), default=500, help="examples per task for the CORE metric (-1 = all)")
    parser.add_argument("--sample-every", type=int_at_least(0, off=-1), default=2000, help="print greedy samples every N steps (-1 = disable)")
    parser.add_argument("--save-every", type=int_at_least(0, off=-1), default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    # Data / output / extras
    parser.add_argument("--data-dir", type=existing_dir, default=None, help="folder of parquet (text column) / jsonl / txt to train on (default: climbmix, else the offline corpus)")
    parser.add_argument("--synthetic-data", action="store_true",
                        help="random tokens instead of text (benchmarks/tests: every world size sees the same global batches)")
    parser.add_argument("--init-from", type=str, default=None,
                        help="TAG[:STEP] of a base checkpoint to continue pretraining from (weights only; new tag, fresh optimizer and schedule)")
    parser.add_argument("--compile", type=int, default=-1, choices=[-1, 0, 1], help="torch.compile the model: 1 = yes, 0 = no, -1 = auto (CUDA, and CPU when a C++ compiler is installed)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>, or <source>_cpt with --init-from)")
    add_push_arguments(parser)
    return parser


def explicit_flags(parser, argv):
    """Destinations of the flags the user actually typed (so defaults can come from elsewhere, e.g. --init-from)."""
    out = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                out.add(action.dest)
    return out


if __name__ == "__main__":
    build_parser().parse_args()  # a bad flag ends here, in a fraction of a second: the imports below take seconds

# Below the flag check on purpose (start-up time, see above); the allocator setting must precede torch's import.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import json
import time
from dataclasses import dataclass, asdict

import torch

from nanochat.attention import HAS_FA3
from nanochat.checkpoint_manager import (save_checkpoint, load_checkpoint, find_last_loadable_step, patch_model_config,
                                         patch_state_dict, check_tokenizer_matches)
from nanochat.common import compute_cleanup, print0, get_base_dir, COMPUTE_DTYPE, warn_if_cpu_is_busy
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import (tokenizing_distributed_data_loader_with_state_bos_bestfit,
                                 tokenizing_distributed_data_loader_bos_bestfit)
from nanochat.fp8 import enable_fp8_training, disable_fp8
from nanochat.gpt import GPT, GPTConfig, compute_window_sizes
from nanochat.hub import CheckpointPusher
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import optimizer_step, set_schedule
from nanochat.report import get_report
from nanochat.samples import SAMPLE_PROMPTS, greedy_samples
from nanochat.scaling import (B_REF, DEFAULT_ROPE_BASE, build_meta_model, model_config_for_depth, ntk_rope_base,
                              plan_training)
from nanochat.synthetic_data import synthetic_loader
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat import training
from nanochat.training import (ManualGC, compile_with_fallback, compute_grad_accum_steps, lr_multiplier, muon_momentum,
                               muon_weight_decay, should_compile)


# -----------------------------------------------------------------------------
# Settings: resolved once from the flags (and the --init-from source), read-only afterwards

@dataclass(frozen=True)
class Settings:
    """What the run does beyond the plain flags: the checkpoint directory it writes, the step it resumes from or
    the checkpoint it continues, the model's config, and the horizon, batch size, LR scale and weight decay the
    scaling laws give for that model."""
    user_config: dict          # the flags (depth from the source with --init-from): wandb config, saved in checkpoints
    model_tag: str
    checkpoint_dir: str
    resume_step: int           # -1: start fresh
    init_from: dict | None     # continued pretraining: tag, dir, step and model config of the source checkpoint
    model_config: GPTConfig
    num_scaling_params: int
    flops_per_token: float
    num_iterations: int
    horizon_source: str        # the flag that set num_iterations
    total_batch_size: int
    batch_auto: bool           # total_batch_size came from the scaling law
    batch_lr_scale: float
    weight_decay_scaled: float
    grad_accum_steps: int

    @property
    def resuming(self):
        return self.resume_step != -1

    @property
    def total_tokens(self):
        return self.total_batch_size * self.num_iterations


def find_init_source(init_from):
    """--init-from TAG[:STEP] -> the source checkpoint's tag, dir, step and model config."""
    tag, _, step = init_from.partition(":")
    directory, tag, step = training.find_checkpoint("base", tag, int(step) if step else None)
    meta = training.read_checkpoint_meta(directory, step)
    return dict(tag=tag, dir=directory, step=step, config=patch_model_config(meta["model_config"]))


def resolve_settings(args, explicit, vocab_size, world_size):
    """Settings from the flags (`explicit`: the ones typed) and, with --init-from, the source checkpoint's meta;
    the scaling laws are applied to a meta-device model, so nothing is allocated yet."""
    init_src = find_init_source(args.init_from) if args.init_from else None
    model_tag = args.model_tag or (f"{init_src['tag']}_cpt" if init_src else f"d{args.depth}")
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    resume_step = find_last_loadable_step(checkpoint_dir) if args.resume_from_step == "last" else args.resume_from_step
    if init_src is None:
        config = model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, vocab_size,
                                        args.window_pattern, args.rope_base or DEFAULT_ROPE_BASE)
    else:
        config = config_for_init_from(args, explicit, init_src, vocab_size)
    model = build_meta_model(config)
    d12_ref = build_meta_model(model_config_for_depth(12, args.aspect_ratio, args.head_dim, config.sequence_len,
                                                      vocab_size, config.window_pattern))
    plan = plan_training(args.num_iterations, args.target_flops, args.target_param_data_ratio, args.total_batch_size,
                         args.weight_decay, model.num_scaling_params(), d12_ref.num_scaling_params(),
                         model.estimate_flops())
    grad_accum_steps = compute_grad_accum_steps(plan["total_batch_size"], args.device_batch_size, config.sequence_len,
                                                world_size)
    return Settings(
        user_config={**vars(args), "depth": config.n_layer}, model_tag=model_tag, checkpoint_dir=checkpoint_dir,
        resume_step=resume_step, init_from=init_src, model_config=config,
        num_scaling_params=model.num_scaling_params(), flops_per_token=model.estimate_flops(),
        num_iterations=plan["num_iterations"], horizon_source=plan["horizon_source"],
        total_batch_size=plan["total_batch_size"], batch_auto=plan["batch_auto"],
        batch_lr_scale=plan["batch_lr_scale"], weight_decay_scaled=plan["weight_decay_scaled"],
        grad_accum_steps=grad_accum_steps)


def config_for_init_from(args, explicit, init_src, vocab_size):
    """Continued pretraining: the architecture comes from the source checkpoint; --max-seq-len (context
    extension), --window-pattern and --rope-base may change, shape flags must agree if given."""
    src = init_src["config"]
    if src["vocab_size"] != vocab_size:
        raise UserError(f"--init-from {init_src['tag']} was trained with vocab_size={src['vocab_size']} but the current "
                         f"tokenizer has {vocab_size} tokens: continued pretraining needs the source's tokenizer.")
    shape_flags = {"depth", "aspect_ratio", "head_dim"} & explicit
    if shape_flags:
        implied = model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, 1, vocab_size, "L")
        got = (implied.n_layer, implied.n_embd, implied.n_head)
        want = (src["n_layer"], src["n_embd"], src["n_head"])
        if got != want:
            raise UserError(f"--init-from {init_src['tag']} has n_layer={want[0]}, n_embd={want[1]}, n_head={want[2]} but "
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
        raise UserError(f"Cannot resume: the checkpoint's model config differs from these flags' ({diff}, as "
                         f"checkpoint vs now). Resume with the same architecture flags as the original run.")
    saved_world = meta.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise UserError(f"Cannot resume: the checkpoint was saved by {saved_world} rank(s) (optimizer state is sharded "
                         f"per rank) but this run has {world_size}. Use torchrun --nproc_per_node={saved_world}.")
    ignore = {"resume_from_step", "run", "push_to", "push_wait"}
    changed = {k: (meta["user_config"].get(k), v) for k, v in user_config.items()
               if k not in ignore and k in meta.get("user_config", {}) and meta["user_config"][k] != v}
    if changed:
        print0(f"WARNING: flags differ from the original run (original vs now): {changed}")


def describe_loader_state(state):
    """The step line's `epoch` field: where the loader is in the data."""
    if not state:
        return "-"
    if "synthetic_batch" in state:
        return f"synthetic {state['synthetic_batch']}"
    parts = [str(state.get("epoch", "?"))] + [f"{k.split('_')[0]}: {state[k]}" for k in ("pq_idx", "rg_idx") if k in state]
    return " ".join(parts)


def print_attention_note(config, device_type):
    if device_type == "cuda" and HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16:
        print0("Using Flash Attention 3 (Hopper)")
    elif "S" in config.window_pattern.upper():
        print0(f"WARNING: no Flash Attention 3 here, so attention runs on PyTorch SDPA, which cannot skip the masked-out "
               f"part of sliding windows: window pattern {config.window_pattern} costs full-context compute plus a mask. "
               f"Recommend --window-pattern L.")


# -----------------------------------------------------------------------------
# The run: setup (__init__) -> loop (run: evaluate, save, one optimization step, log) -> summary (finish)

class PretrainingRun:
    """One pretraining run; train() shows its shape."""

    def __init__(self, args, explicit):
        self.args = args
        self.rt = rt = training.init_runtime(args.device_type, args.seed)
        if rt.device_type == "cuda":
            print0(f"GPU: {torch.cuda.get_device_name(0)} | peak bf16 FLOP/s: {rt.peak_flops:.2e}" +
                   ("" if rt.peak_flops else " (unknown GPU: MFU reads 0)"))
        print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} | device: {rt.device} | world size: {rt.world_size}")
        if rt.device_type == "cpu":
            warn_if_cpu_is_busy()
        self.tokenizer = get_tokenizer()
        self.token_bytes = get_token_bytes(device=rt.device)
        print0(f"Vocab size: {self.tokenizer.get_vocab_size():,}")
        self.s = s = resolve_settings(args, explicit, self.tokenizer.get_vocab_size(), rt.world_size)
        training.check_memory_fits(build_meta_model(s.model_config), args.device_batch_size,
                                   s.model_config.sequence_len, rt)  # before anything is allocated
        self.wandb_run = training.init_wandb(args.run, "nanochat", s.user_config, rt.master)
        self.pusher = CheckpointPusher(args.push_to)

        self.model, optimizer_data, resume_meta = self.build_model()  # uncompiled: saving, sampling, CORE
        use_compile = should_compile(args.compile, rt.device_type)
        self.print_plan()
        self.optimizer = self.model.setup_optimizer(
            unembedding_lr=args.unembedding_lr * s.batch_lr_scale, embedding_lr=args.embedding_lr * s.batch_lr_scale,
            scalar_lr=args.scalar_lr * s.batch_lr_scale, matrix_lr=args.matrix_lr * s.batch_lr_scale,
            weight_decay=s.weight_decay_scaled)
        if optimizer_data is not None:
            training.load_optimizer_state(self.optimizer, optimizer_data)  # this run's LRs (e.g. lowered after a NaN)
        training.check_run_can_save(s.checkpoint_dir, self.model, self.optimizer, rt)
        self.scaler = training.make_grad_scaler()
        self.setup_data(resume_meta)
        self.train_model = compile_with_fallback(self.model, self.x, self.y) if use_compile else self.model

        loop = resume_meta["loop_state"] if resume_meta else {}
        self.step = resume_meta["step"] if resume_meta else 0
        self.val_bpb = resume_meta["val_bpb"] if resume_meta else None
        self.min_val_bpb = loop.get("min_val_bpb", float("inf"))
        self.meter = training.resumed_meter(loop, s.flops_per_token, rt)
        self.core_results, self.losses, self.val_curve = {}, {}, []

    def build_model(self):
        """The model on the device with fresh weights, the resumed checkpoint's or the --init-from source's (then
        fp8 if asked). Returns (model, optimizer state to resume or None, resume meta or None)."""
        s, rt = self.s, self.rt
        with torch.device("meta"):
            model = GPT(s.model_config)
        print0(f"Model config:\n{json.dumps(asdict(s.model_config), indent=2)}")
        print_attention_note(s.model_config, rt.device_type)
        model.to_empty(device=rt.device)
        model.init_weights()
        optimizer_data = meta = None
        if s.resuming:
            print0(f"Resuming from step {s.resume_step} of {s.checkpoint_dir}")
            model_data, optimizer_data, meta = load_checkpoint(s.checkpoint_dir, s.resume_step, rt.device,
                                                               load_optimizer=True, rank=rt.rank)
            check_resume_compatible(meta, asdict(s.model_config), s.user_config, rt.world_size)
            check_tokenizer_matches(meta, self.tokenizer, f"{s.checkpoint_dir} step {s.resume_step}")
            model.load_state_dict(patch_state_dict(model_data, model), strict=True, assign=True)
        elif s.init_from is not None:
            print0(f"Initializing weights from {s.init_from['dir']} step {s.init_from['step']}")
            model_data, _, init_meta = load_checkpoint(s.init_from["dir"], s.init_from["step"], rt.device)
            check_tokenizer_matches(init_meta, self.tokenizer, f"{s.init_from['dir']} step {s.init_from['step']}")
            model.load_state_dict(patch_state_dict(model_data, model), strict=True, assign=True)
        if self.args.fp8:
            enable_fp8_training(model, self.args.fp8_recipe, rt.device_type)
        return model, optimizer_data, meta

    def print_plan(self):
        args, s = self.args, self.s
        print0("Parameter counts:")
        for key, value in self.model.num_params_by_group().items():
            print0(f"{key:24s}: {value:,}")
        print0(f"Estimated FLOPs per token: {s.flops_per_token:e}")
        if s.batch_auto:
            print0(f"Auto-computed optimal batch size: {s.total_batch_size:,} tokens")
        if s.batch_lr_scale != 1.0:
            print0(f"Scaling LRs by {s.batch_lr_scale:.4f} for batch size {s.total_batch_size:,} (reference: {B_REF:,})")
        if s.weight_decay_scaled != args.weight_decay:
            print0(f"Scaling weight decay from {args.weight_decay:.6f} to {s.weight_decay_scaled:.6f} for depth {s.model_config.n_layer}")
        print0(f"Number of iterations from {s.horizon_source}: {s.num_iterations:,}")
        if s.init_from is not None and s.horizon_source == "--target-param-data-ratio":
            print0("NOTE: continued pretraining with the from-scratch horizon; pass --num-iterations for a shorter phase")
        print0(f"Total number of training tokens: {s.total_tokens:,}")
        print0(f"Tokens : Scaling params ratio: {s.total_tokens / s.num_scaling_params:.2f}")
        print0(f"Total training FLOPs estimate: {s.flops_per_token * s.total_tokens:e}")
        training.print_batch_arithmetic(args.device_batch_size, s.model_config.sequence_len, s.total_batch_size,
                                        s.grad_accum_steps)

    def setup_data(self, resume_meta):
        """The train loader (after the last trained batch when resuming, its first batch prefetched) and a
        builder of val loaders."""
        args, rt = self.args, self.rt
        B, T, vocab_size = args.device_batch_size, self.s.model_config.sequence_len, self.tokenizer.get_vocab_size()
        # multi-rank runs save every rank's loader state (the loader picks its own); nanochat's meta has rank 0's only
        loader_resume = (resume_meta.get("dataloader_state_dicts") or resume_meta["dataloader_state_dict"]) if resume_meta else None
        if args.synthetic_data:
            self.train_loader = synthetic_loader(vocab_size, B, T, rt.device, rt.rank, rt.world_size,
                                                 resume_state_dict=loader_resume)
            self.build_val_loader = lambda: synthetic_loader(vocab_size, B, T, rt.device, rt.rank, rt.world_size,
                                                             seed_offset=10 ** 9)
        else:
            self.train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
                self.tokenizer, B, T, split="train", device=rt.device, resume_state_dict=loader_resume,
                data_dir=args.data_dir)
            self.build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(
                self.tokenizer, B, T, split="val", device=rt.device, data_dir=args.data_dir)
        self.x, self.y, self.loader_state = next(self.train_loader)
        # loader state after the last batch actually trained on (what resume needs; the prefetched batch is not in it)
        self.consumed_state = loader_resume[rt.rank] if isinstance(loader_resume, list) else loader_resume

    def run(self):
        args, s = self.args, self.s
        with ManualGC() as manual_gc:
            while True:
                last_step = self.step == s.num_iterations  # one extra pass so the end of the run is evaluated and saved
                flops_so_far = s.flops_per_token * s.total_batch_size * self.step
                self.evaluate(last_step, flops_so_far)
                if training.is_save_step(self.step, max(s.resume_step, 0), args.save_every, last_step):
                    self.save()
                if last_step:
                    break
                lrm = self.train_step()
                self.log_step(lrm, flops_so_far)
                self.step += 1
                manual_gc.after_step(self.step)

    def evaluate(self, last_step, flops_so_far):
        args, step = self.args, self.step
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            self.evaluate_val_bpb(flops_so_far)
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            self.evaluate_core_metric(flops_so_far)
        if args.sample_every > 0 and self.rt.master and (last_step or (step > 0 and step % args.sample_every == 0)):
            self.print_samples()

    def evaluate_val_bpb(self, flops_so_far):
        rt, B, T = self.rt, self.args.device_batch_size, self.s.model_config.sequence_len
        eval_steps = max(1, self.args.eval_tokens // (B * T * rt.world_size))
        self.train_model.eval()
        with disable_fp8(self.train_model):
            self.val_bpb = evaluate_bpb(self.train_model, self.build_val_loader(), eval_steps, self.token_bytes)
        print0(f"Step {self.step:05d} | Validation bpb: {self.val_bpb:.6f}")
        self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
        self.val_curve.append((self.step, self.val_bpb))
        self.wandb_run.log({"step": self.step, "total_training_flops": flops_so_far,
                            "total_training_time": self.meter.total_time, "val/bpb": self.val_bpb})
        self.train_model.train()

    def evaluate_core_metric(self, flops_so_far):
        self.train_model.eval()
        try:
            with disable_fp8(self.model):
                self.core_results = evaluate_core(self.model, self.tokenizer, self.rt.device,
                                                  max_per_task=self.args.core_metric_max_per_task)
            print0(f"Step {self.step:05d} | CORE metric: {self.core_results['core_metric']:.4f}")
            self.wandb_run.log({"step": self.step, "total_training_flops": flops_so_far,
                                "core_metric": self.core_results["core_metric"],
                                "centered_results": self.core_results["centered_results"]})
        except Exception as e:  # a missing eval bundle must not kill hours of training
            print0(f"WARNING: CORE evaluation failed ({type(e).__name__}: {e}); training continues")
        self.train_model.train()

    def print_samples(self):
        self.model.eval()
        with disable_fp8(self.model):
            for text in greedy_samples(self.model, self.tokenizer, SAMPLE_PROMPTS, max_tokens=16):
                print0(text)
        self.model.train()

    def save(self):
        args, s, rt, meter = self.args, self.s, self.rt, self.meter
        # each rank reads its own stripe: keep every rank's position for an exact resume
        loader_states = training.gather_from_ranks(self.consumed_state, rt)
        meta = training.checkpoint_meta(
            self.step, self.val_bpb, asdict(s.model_config), s.user_config, args.device_batch_size,
            s.model_config.sequence_len, s.total_batch_size, tokenizer=self.tokenizer,
            dataloader_state_dict=loader_states[0],  # rank 0's, as nanochat
            loop_state={"min_val_bpb": self.min_val_bpb, "smooth_train_loss": meter.smooth_loss,
                        "total_training_time": meter.total_time},
            # ours, beyond nanochat's fields
            num_iterations=s.num_iterations, world_size=rt.world_size,
            dataloader_state_dicts=loader_states if rt.ddp else None, rope_base=s.model_config.rope_base,
            init_from=None if s.init_from is None else f"{s.init_from['tag']}:{s.init_from['step']}",
            core_metric=self.core_results.get("core_metric"))
        save_checkpoint(s.checkpoint_dir, self.step, self.model.state_dict(), self.optimizer.state_dict(), meta,
                        rank=rt.rank)
        self.pusher.push(s.checkpoint_dir, self.step)

    def train_step(self):
        """Optimization step number self.step: grad_accum_steps micro-batches (the next one prefetched while the
        device works), then the scheduled update. Returns the LR multiplier."""
        args, s, rt = self.args, self.s, self.rt
        rt.synchronize()
        t0 = time.time()
        loss_sum = torch.zeros((), device=rt.device)
        for _ in range(s.grad_accum_steps):
            loss = self.train_model(self.x, self.y)
            loss_sum += loss.detach()
            training.backward(loss / s.grad_accum_steps, self.scaler)  # each backward() sums gradients: normalize here
            self.consumed_state = self.loader_state
            self.x, self.y, self.loader_state = next(self.train_loader)
        lrm = lr_multiplier(self.step, s.num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(self.optimizer, lrm, muon_momentum(self.step, s.num_iterations, args.warmdown_ratio),
                     muon_weight_decay(self.step, s.num_iterations, s.weight_decay_scaled))
        optimizer_step(self.optimizer, self.scaler, rt.ddp)
        self.model.zero_grad(set_to_none=True)
        train_loss = training.mean_over_ranks(loss_sum / s.grad_accum_steps, rt)  # the loss of the whole batch
        training.check_finite_loss(train_loss, self.step)
        rt.synchronize()
        self.losses[self.step] = train_loss
        self.meter.update(train_loss, time.time() - t0, s.total_batch_size, steps_done=self.step + 1)
        return lrm

    def log_step(self, lrm, flops_so_far):
        s, meter, step = self.s, self.meter, self.step
        epoch = describe_loader_state(self.consumed_state)
        print0(meter.line(f"{step:05d}/{s.num_iterations:05d}", 100 * step / s.num_iterations, lrm, epoch,
                          meter.eta(s.num_iterations - step - 1), mfu_label="bf16_mfu"))
        if step % 100 == 0:
            self.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                                "total_training_time": meter.total_time, **meter.wandb_metrics(), "train/lrm": lrm,
                                "train/epoch": epoch})

    def finish(self):
        """Summary lines and the report section; returns what callers and tests look at."""
        s = self.s
        peak_mem = training.peak_memory_mib(self.rt.device_type)
        print0(f"Peak memory usage: {peak_mem:.2f}MiB")
        print0(f"Total training time: {self.meter.total_time / 60:.2f}m")
        if self.val_bpb is not None:
            print0(f"Minimum validation bpb: {self.min_val_bpb:.6f}")
        if self.rt.master:
            self.log_report(peak_mem)
        self.wandb_run.finish()
        return dict(losses=self.losses, val_bpb=self.val_bpb, min_val_bpb=self.min_val_bpb,
                    num_iterations=s.num_iterations, total_batch_size=s.total_batch_size,
                    grad_accum_steps=s.grad_accum_steps, checkpoint_dir=s.checkpoint_dir,
                    model_config=asdict(s.model_config), core_metric=self.core_results.get("core_metric"),
                    val_bpb_curve=self.val_curve)

    def log_report(self, peak_mem):
        s, section = self.s, "Base model training"
        report = get_report()
        report.log(section=section, data=[s.user_config, {
            "Number of parameters": self.model.num_params_by_group()["total"],
            "Number of scaling parameters": s.num_scaling_params,
            "Number of FLOPs per token": f"{s.flops_per_token:e}",
            "Calculated number of iterations": s.num_iterations,
            "Number of training tokens": s.total_tokens,
            "Tokens : Scaling params ratio": s.total_tokens / s.num_scaling_params,
            "Total batch size": s.total_batch_size,
            "Gradient accumulation steps": s.grad_accum_steps,
            "DDP world size": self.rt.world_size,
            "LR scale (batch)": s.batch_lr_scale,
            "Muon weight decay (scaled)": s.weight_decay_scaled,
            "Context length": s.model_config.sequence_len,
            "RoPE base": s.model_config.rope_base,
            "Initialized from": self.args.init_from or "scratch",
            "Minimum validation bpb": self.min_val_bpb if self.val_bpb is not None else None,
            "Final validation bpb": self.val_bpb,
            "CORE metric estimate": self.core_results.get("core_metric"),
            "MFU %": f"{self.meter.mfu:.2f}%",
            "Total training flops": f"{s.flops_per_token * s.total_tokens:e}",
            "Total training time": f"{self.meter.total_time / 60:.2f}m",
            "Peak memory usage": f"{peak_mem:.2f}MiB",
        }])
        if self.losses:
            report.log_series("train loss", list(self.losses), list(self.losses.values()), section=section)
        if self.val_curve:
            report.log_series("val bpb", [step for step, _ in self.val_curve], [v for _, v in self.val_curve],
                              section=section)


def train(args, explicit=frozenset()):
    """Run pretraining. Returns a dict (per-step losses, val bpb, checkpoint dir, ...) for callers and tests."""
    run = PretrainingRun(args, explicit)  # setup: device, settings, model, optimizer, data
    try:
        run.run()                         # the loop: evaluate, save (and push), one optimization step, log
    finally:
        run.pusher.close(args.push_wait)  # uploads still running get a bounded wait, even after a crash
    return run.finish()                   # summary and report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return train(args, explicit=explicit_flags(parser, argv))
    finally:
        compute_cleanup()


if __name__ == "__main__":
    exit_on_user_error(main)
