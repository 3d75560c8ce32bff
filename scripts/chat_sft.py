"""
Supervised fine-tuning (SFT): teach a pretrained model the chat format, tool use and its persona.

    python -m scripts.chat_sft                                   # reference mixture, from the base model
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size=16
    python -m scripts.chat_sft --offline --num-iterations=300    # no hub: identity, spelling, arithmetic
    python -m scripts.chat_sft --source sft --custom-only --extra-train-jsonl my.jsonl:3 --output-tag mine
    python -m scripts.chat_sft --preset midtrain                 # nanochat's older midtraining stage

Conversations are rendered with loss masks (only the assistant's tokens are trained), packed into rows with
best-fit (each row starts at a conversation's <|bos|>; what no longer fits is padded, never cropped) and the
loss of a step is sum(per-token loss) / (number of trained tokens in the whole step, all micro-batches and
ranks): a micro-batch with nothing to train on adds zero loss and zero gradient instead of NaN.
Batch sizes and learning rates are inherited from the source checkpoint unless given.
Checkpoints: $NANOCHAT_BASE_DIR/chatsft_checkpoints/<tag>/ (mid_checkpoints/ for --preset midtrain).
"""

import argparse
import os
import re

from nanochat.cli import (add_lr_arguments, add_run_arguments, add_start_arguments, ArgumentParser, existing_file,
                          exit_on_user_error, float_at_least, fraction, int_at_least, UserError)
from nanochat.remote import add_push_arguments

# -----------------------------------------------------------------------------
# CLI: every flag (and data path) is checked as it is parsed, before torch and the rest are imported below

# --preset midtrain: the settings of nanochat's scripts/mid_train.py (before it was folded into SFT):
# fixed LRs, train on every token (not just the assistant's), best-fit-crop packing, flat LR then a linear
# decay over the last 20%, fresh optimizer, its own mixture, checkpoints under mid_checkpoints/.
MIDTRAIN_DEFAULTS = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, init_lr_frac=1.0,
                         warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, eval_every=150,
                         eval_tokens=20 * 524288, chatcore_every=-1, load_optimizer=0, packing="crop",
                         loss_on="all")


def parse_jsonl_spec(spec):
    """'path' or 'path:REPEAT' -> (path, repeat); argparse.ArgumentTypeError for a REPEAT below 1 or a path that
    is not a readable file. A ':' that is part of the path (C:\\x) is left alone."""
    path, repeat = spec, 1
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"-?\d+", tail):
        path, repeat = head, int(tail)
        if repeat < 1:
            raise argparse.ArgumentTypeError(f"{spec}: REPEAT must be a whole number >= 1, got {repeat}")
    return existing_file(path), repeat


def jsonl_spec(text):
    """argparse type of --extra-train-jsonl: PATH[:REPEAT], checked (the string is kept as typed)."""
    parse_jsonl_spec(text)
    return text


def build_parser():
    parser = ArgumentParser(description="Supervised fine-tuning (SFT) of a nanochat model",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # logging / runtime
    add_run_arguments(parser)
    parser.add_argument("--preset", type=str, default="sft", choices=["sft", "midtrain"],
                        help="sft: the reference SFT; midtrain: nanochat's older midtraining stage (its mixture, "
                             "LRs and schedule, loss on all tokens, output to mid_checkpoints/)")
    # model loading
    add_start_arguments(parser, "base")
    parser.add_argument("--load-optimizer", type=int, default=1, choices=[0, 1],
                        help="warm-start the optimizer from the source checkpoint's shard (0=no, 1=yes)")
    # horizon
    parser.add_argument("--num-iterations", type=int_at_least(1, off=-1), default=-1, help="optimization steps (-1 = one full epoch)")
    # batch sizes (None = inherit from the source checkpoint)
    parser.add_argument("--max-seq-len", type=int_at_least(1), default=None, help="row length in tokens (default: inherit)")
    parser.add_argument("--device-batch-size", type=int_at_least(1), default=None, help="rows per device (default: inherit)")
    parser.add_argument("--total-batch-size", type=int_at_least(1), default=None, help="tokens per step (default: inherit)")
    # optimization (None = inherit from the source checkpoint)
    add_lr_arguments(parser)
    parser.add_argument("--init-lr-frac", type=float_at_least(0), default=0.8, help="initial LR as a fraction of the base LR")
    parser.add_argument("--warmup-ratio", type=fraction, default=0.0, help="fraction of training for LR warmup")
    parser.add_argument("--warmdown-ratio", type=fraction, default=0.5, help="fraction of training for LR warmdown")
    parser.add_argument("--final-lr-frac", type=fraction, default=0.0, help="final LR as a fraction of the initial LR")
    # evaluation
    parser.add_argument("--eval-every", type=int_at_least(0, off=-1), default=200, help="val bpb every N steps (-1 = only at the end)")
    parser.add_argument("--eval-tokens", type=int_at_least(1), default=40 * 524288, help="tokens to evaluate val bpb on")
    parser.add_argument("--chatcore-every", type=int_at_least(0, off=-1), default=200,
                        help="chat eval every N steps and at the end (-1 = never): ChatCORE's six tasks, or "
                             "SpellingBee + Arithmetic with the offline mixture")
    parser.add_argument("--chatcore-max-cat", type=int_at_least(1, off=-1), default=-1, help="max problems per categorical task")
    parser.add_argument("--chatcore-max-sample", type=int_at_least(1, off=-1), default=24, help="max problems per generative task")
    parser.add_argument("--save-every", type=int_at_least(0, off=-1), default=-1, help="also save every N steps (-1 = only at the end)")
    # data
    parser.add_argument("--mmlu-epochs", type=int_at_least(0), default=3, help="epochs of MMLU auxiliary_train in the mixture")
    parser.add_argument("--gsm8k-epochs", type=int_at_least(0), default=4, help="epochs of GSM8K train in the mixture")
    parser.add_argument("--identity-epochs", type=int_at_least(0), default=2, help="epochs of the identity conversations")
    parser.add_argument("--identity-jsonl", type=existing_file, default=None,
                        help="identity conversations (default: $NANOCHAT_BASE_DIR/identity_conversations.jsonl "
                             "if present, else the persona file shipped with nanochat)")
    parser.add_argument("--offline", action="store_true",
                        help="offline mixture: identity, SimpleSpelling/SpellingBee (offline words), procedural "
                             "arithmetic with calculator calls (also used automatically when the hub is unreachable)")
    parser.add_argument("--offline-size", type=int_at_least(1), default=20000,
                        help="offline mixture: rows of each procedural task (SimpleSpelling, SpellingBee, Arithmetic)")
    parser.add_argument("--extra-train-jsonl", type=jsonl_spec, action="append", default=[], metavar="PATH[:REPEAT]",
                        help="add your conversations (JSONL) to the training mixture, REPEAT times (repeatable)")
    parser.add_argument("--extra-val-jsonl", type=existing_file, action="append", default=[], metavar="PATH",
                        help="add your conversations (JSONL) to the validation mixture (repeatable)")
    parser.add_argument("--custom-only", action="store_true",
                        help="train only on --extra-train-jsonl (validate on --extra-val-jsonl, else on the train rows)")
    parser.add_argument("--think-default", type=str, default=None, choices=["on", "off"],
                        help="the trained model's think mode when a chat does not choose one (saved in the "
                             "checkpoint's meta; chat_cli/chat_eval/chat_probe then prefill <think> or an empty "
                             "think block). Unset: nothing is prefilled")
    parser.add_argument("--packing", type=str, default="pad", choices=["pad", "crop"],
                        help="when no conversation fits the rest of a row: pad it (SFT) or crop one in (midtrain)")
    parser.add_argument("--loss-on", type=str, default="assistant", choices=["assistant", "all"],
                        help="train on the assistant's tokens only (SFT) or on every token (midtrain)")
    add_push_arguments(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset == "midtrain":  # preset values become the defaults; explicit flags still win
        parser.set_defaults(**MIDTRAIN_DEFAULTS)
        args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    parse_args()  # a bad flag or data path ends here, in a fraction of a second: the imports below take seconds

# Below the flag check on purpose (start-up time, see above); the allocator setting must precede torch's import.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import time
from dataclasses import dataclass, asdict
from importlib import resources

import torch
import torch.distributed as dist

from nanochat.chat_dataloader import ConversationPacker
from nanochat.chat_eval import ALL_TASKS, evaluate_chat_tasks
from nanochat.checkpoint_manager import build_model
from nanochat.common import get_base_dir, print0
from nanochat.hub import CheckpointPusher
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import optimizer_step, set_schedule
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat import training
from nanochat.training import (ManualGC, compute_grad_accum_steps, linear_ramp, progress_lr_multiplier,
                               step_loss_scale)
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.hub import TaskDataUnavailable
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


# -----------------------------------------------------------------------------
# Data: mixtures

def default_identity_path():
    user_file = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    if os.path.exists(user_file):
        return user_file
    return str(resources.files("nanochat").joinpath("data", "identity_conversations.jsonl"))


def load_custom(path):
    """A user's JSONL as a CustomJSON task; bad rows are reported as path:line: reason (nothing trains on them)."""
    try:
        return CustomJSON(filepath=path)
    except ValueError as e:
        raise UserError(f"{path} has malformed conversations, fix them first:\n{e}") from None


def hub_mixture(args, identity_path):
    """The reference mixture (hub data, or local copies via NANOCHAT_TASK_DATA*). Raises TaskDataUnavailable."""
    identity = CustomJSON(filepath=identity_path)
    if args.preset == "midtrain":
        train = [SmolTalk(split="train"), MMLU(subset="auxiliary_train", split="train"),
                 GSM8K(subset="main", split="train"), *[identity] * args.identity_epochs,
                 SimpleSpelling(size=200000, split="train"), SpellingBee(size=80000, split="train")]
    else:
        train = [SmolTalk(split="train"), *[identity] * args.identity_epochs,
                 *[MMLU(subset="all", split="auxiliary_train") for _ in range(args.mmlu_epochs)],
                 *[GSM8K(subset="main", split="train") for _ in range(args.gsm8k_epochs)],
                 SimpleSpelling(size=200000, split="train"), SpellingBee(size=80000, split="train")]
    val = [SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
           GSM8K(subset="main", split="test", stop=420)]
    return train, val


def offline_mixture(args, identity_path):
    """Everything generated or shipped locally: the persona, spelling/letter counting over the offline word
    list, and GSM8K-style arithmetic with calculator calls."""
    n = args.offline_size
    identity = CustomJSON(filepath=identity_path)
    train = [*[identity] * args.identity_epochs, SimpleSpelling(size=n, split="train"),
             SpellingBee(size=n, split="train"), Arithmetic(size=n, split="train")]
    val = [SimpleSpelling(size=200, split="test"), SpellingBee(size=200, split="test"),
           Arithmetic(size=200, split="test")]
    return train, val


def build_mixtures(args):
    """(train TaskMixture, val TaskMixture, description, offline?)"""
    extra_train = []
    for spec in args.extra_train_jsonl:
        path, repeat = parse_jsonl_spec(spec)
        task = load_custom(path)
        print0(f"Extra training data: {path} ({len(task):,} conversations) x{repeat}")
        extra_train += [task] * repeat
    extra_val = [load_custom(parse_jsonl_spec(p)[0]) for p in args.extra_val_jsonl]

    offline = args.offline
    if args.custom_only:
        if not extra_train:
            raise UserError("--custom-only needs at least one --extra-train-jsonl PATH[:REPEAT]")
        train, val, what = [], [], "custom only"
        if not extra_val:
            print0("NOTE: --custom-only without --extra-val-jsonl: val bpb is measured on the training rows")
            val = list(dict.fromkeys(extra_train))  # each file once
    else:
        identity_path = args.identity_jsonl or default_identity_path()
        print0(f"Identity conversations: {identity_path}")
        if not offline:
            try:
                train, val = hub_mixture(args, identity_path)
                what = "midtraining mixture" if args.preset == "midtrain" else "reference SFT mixture"
            except TaskDataUnavailable as e:
                print0(f"NOTE: task data is unavailable ({str(e).splitlines()[0][:300]}).\n"
                       f"NOTE: falling back to the offline mixture (pass --offline to skip this check).")
                offline = True
        if offline:
            train, val = offline_mixture(args, identity_path)
            what = "offline mixture (identity, SimpleSpelling, SpellingBee, Arithmetic)"
    train_ds = TaskMixture(train + extra_train)
    val_ds = TaskMixture(val + extra_val)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError("the training or validation mixture is empty (empty JSONL files?)")
    return train_ds, val_ds, what, offline


# -----------------------------------------------------------------------------
# Settings: resolved once from the flags and the start checkpoint, read-only afterwards

@dataclass(frozen=True)
class Settings:
    """What the run does beyond the plain flags: where its weights come from and where its checkpoints go, and
    the batch sizes and LRs (a flag left unset inherits the source checkpoint's value). The run reads these,
    never the flags they resolve (args.max_seq_len may be None)."""
    start: training.StartPoint  # the source, the weights this run starts from and where its checkpoints go
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    grad_accum_steps: int
    report_section: str
    user_config: dict        # the flags with the inherited values filled in, saved in every checkpoint


def inherit_from(args, meta):
    """Batch sizes and LRs: the flags when given, else the start checkpoint's (printing where each came from)."""
    source_user_config = meta.get("user_config") or {}
    model_seq_len = (meta.get("model_config") or {}).get("sequence_len", 2048)
    return training.inherit_settings([
        ("max_seq_len", args.max_seq_len, meta.get("max_seq_len"), model_seq_len),
        ("device_batch_size", args.device_batch_size, meta.get("device_batch_size"), 32),
        ("total_batch_size", args.total_batch_size, meta.get("total_batch_size"), 524288),
        ("embedding_lr", args.embedding_lr, source_user_config.get("embedding_lr"), 0.3),
        ("unembedding_lr", args.unembedding_lr, source_user_config.get("unembedding_lr"), 0.004),
        ("matrix_lr", args.matrix_lr, source_user_config.get("matrix_lr"), 0.02),
    ])


def resolve_settings(args, world_size):
    """Settings from the flags and the start checkpoint's meta (read before any weights are loaded)."""
    start = training.resolve_start(args.source, args.model_tag, args.model_step,
                                   "mid" if args.preset == "midtrain" else "sft", args.output_tag, args.resume_from_step)
    inherited = inherit_from(args, start.meta)
    grad_accum_steps = compute_grad_accum_steps(inherited["total_batch_size"], inherited["device_batch_size"],
                                                inherited["max_seq_len"], world_size)
    return Settings(start=start, grad_accum_steps=grad_accum_steps,
                    user_config={**vars(args), **inherited},
                    report_section="Midtraining" if args.preset == "midtrain" else "Chat SFT", **inherited)


# -----------------------------------------------------------------------------
# The run: setup (__init__) -> loop (run: evaluate, save, one optimization step, log) -> summary (finish)

class SFTRun:
    """One fine-tuning run; main() shows its shape."""

    def __init__(self, args):
        self.args = args
        self.rt = rt = training.init_runtime(args.device_type)
        project = "nanochat-mid" if args.preset == "midtrain" else "nanochat-sft"
        self.wandb_run = training.init_wandb(args.run, project, vars(args).copy(), rt.master)
        self.s = s = resolve_settings(args, rt.world_size)
        self.pusher = CheckpointPusher(args.push_to)
        # the data first: a malformed file stops the run before the model and optimizer are loaded
        self.train_ds, self.val_ds, self.mixture_desc, self.offline = build_mixtures(args)
        self.model, self.tokenizer, _ = build_model(s.start.start_dir, s.start.start_step, rt.device, phase="train")
        resume_meta = s.start.meta if s.start.resuming else None
        training.print_batch_arithmetic(s.device_batch_size, s.max_seq_len, s.total_batch_size, s.grad_accum_steps)
        training.check_memory_fits(self.model, s.device_batch_size, s.max_seq_len, rt, model_loaded=True)
        self.optimizer = self.setup_optimizer()
        training.check_run_can_save(s.start.output_dir, self.model, self.optimizer, rt)
        self.scaler = training.make_grad_scaler()
        self.train_model = self.model  # compiled on CUDA; self.model (uncompiled) saves and runs the chat evals
        if rt.device_type == "cuda":
            dummy = torch.zeros(s.device_batch_size, s.max_seq_len, dtype=torch.long, device=rt.device)
            self.train_model = training.compile_with_fallback(self.model, dummy, dummy, loss_reduction="sum")
        self.token_bytes = get_token_bytes(device=rt.device)
        self.setup_data(resume_meta)
        self.report = get_report()
        loop = resume_meta["loop_state"] if resume_meta else {}
        self.step = self.start_step = loop.get("step", 0)
        self.min_val_bpb = loop.get("min_val_bpb", float("inf"))
        self.progress = loop.get("progress", 0.0)
        self.val_bpb = loop.get("val_bpb")
        self.trained_tokens = loop.get("trained_tokens", 0)
        self.meter = training.resumed_meter(loop, self.model.estimate_flops(), rt)
        self.chat_results = {}
        self.chat_tasks = {}  # built at the first chat eval, then reused
        self.data_done = False

    def setup_optimizer(self):
        """Fresh LRs (x --init-lr-frac); momentum buffers from the start checkpoint when resuming or warm-starting."""
        args, s = self.args, self.s
        optimizer = self.model.setup_optimizer(unembedding_lr=s.unembedding_lr, embedding_lr=s.embedding_lr,
                                               matrix_lr=s.matrix_lr, weight_decay=args.weight_decay)
        if s.start.resuming or args.load_optimizer:
            training.warm_start_optimizer(optimizer, s.start.start_dir, s.start.start_step, self.rt,
                                          required=s.start.resuming)
        training.scale_learning_rates(optimizer, args.init_lr_frac)
        return optimizer

    def setup_data(self, resume_meta):
        args, s, rt = self.args, self.s, self.rt
        print0(f"Training mixture ({self.mixture_desc}): {len(self.train_ds):,} conversations; validation: {len(self.val_ds):,}")
        self.loader_kwargs = dict(tokenizer=self.tokenizer, batch_size=s.device_batch_size, seq_len=s.max_seq_len,
                                  device=rt.device, rank=rt.rank, world_size=rt.world_size, packing=args.packing,
                                  loss_on=args.loss_on)
        resume_state = resume_meta["dataloader_state_dicts"][rt.rank] if resume_meta else None
        self.train_loader = ConversationPacker(self.train_ds, stop_at_epoch_end=args.num_iterations <= 0,
                                               resume_state=resume_state, **self.loader_kwargs)

    def run(self):
        args = self.args
        with ManualGC() as manual_gc:
            while True:
                last_step = self.data_done or (args.num_iterations > 0 and self.step >= args.num_iterations)
                flops_so_far = self.meter.flops_per_token * self.s.total_batch_size * self.step
                self.evaluate(last_step, flops_so_far)
                if training.is_save_step(self.step, self.start_step, args.save_every, last_step):
                    self.save()
                if last_step:
                    break
                lrm, step_tokens = self.train_step()
                self.log_step(lrm, step_tokens, flops_so_far)
                manual_gc.after_step(self.step)

    def evaluate(self, last_step, flops_so_far):
        args, step = self.args, self.step
        resumed_here = self.s.start.resuming and step == self.start_step  # the resumed run evaluated this step already
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0 and not resumed_here):
            self.evaluate_val_bpb(flops_so_far)
        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            self.evaluate_chat()

    def evaluate_val_bpb(self, flops_so_far):
        s, rt = self.s, self.rt
        eval_steps = max(1, self.args.eval_tokens // (s.device_batch_size * s.max_seq_len * rt.world_size))
        self.train_model.eval()
        try:
            self.val_bpb = evaluate_bpb(self.train_model, ConversationPacker(self.val_ds, **self.loader_kwargs),
                                        eval_steps, self.token_bytes)
        except ValueError as e:  # nothing countable in the val rows (e.g. every answer truncated away)
            print0(f"WARNING: no val bpb: {e}")
            self.val_bpb = None
        self.train_model.train()
        if self.val_bpb is not None:
            self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
            print0(f"Step {self.step:05d} | Validation bpb: {self.val_bpb:.4f}")
            self.report.log_point("val bpb", self.step, self.val_bpb, section=s.report_section)
            self.wandb_run.log({"step": self.step, "total_training_flops": flops_so_far, "val/bpb": self.val_bpb})

    def evaluate_chat(self):
        """ChatCORE's six tasks, or the offline mixture's own two (SpellingBee, Arithmetic)."""
        args = self.args
        self.train_model.eval()
        t0 = time.time()
        names = ["SpellingBee", "Arithmetic"] if self.offline else ALL_TASKS
        self.chat_results = evaluate_chat_tasks(self.model, self.tokenizer, names, self.s.device_batch_size,
                                                args.chatcore_max_cat, args.chatcore_max_sample, self.chat_tasks)
        self.train_model.train()
        print0(f"Step {self.step:05d} | chat eval ({time.time() - t0:.0f}s): " +
               ", ".join(f"{k}: {v:.4f}" for k, v in self.chat_results.items()))
        for name, acc in self.chat_results.items():
            self.report.log_point(name, self.step, acc, section=self.s.report_section)
        self.wandb_run.log({"step": self.step, **{f"chatcore/{k}": v for k, v in self.chat_results.items()}})

    def save(self):
        s, rt, meter = self.s, self.rt, self.meter
        meta = training.checkpoint_meta(
            s.start.step_offset + self.step, self.val_bpb, asdict(self.model.config), s.user_config,
            s.device_batch_size, s.max_seq_len, s.total_batch_size, tokenizer=self.tokenizer,
            dataloader_state_dicts=training.gather_from_ranks(self.train_loader.state_dict(), rt),
            **training.fine_tuning_state(s.start, self.args.source, self.step, self.args.num_iterations, meter,
                                         min_val_bpb=self.min_val_bpb, progress=self.progress, val_bpb=self.val_bpb,
                                         trained_tokens=self.trained_tokens))
        training.save_run_checkpoint(s.start, self.step, self.model, self.optimizer, meta, rt.rank, self.pusher)

    def train_step(self):
        """One optimization step over grad_accum_steps packed micro-batches; the loss is the mean over every
        trained token of the step. Returns (LR multiplier, trained tokens of the step, all ranks)."""
        args, s, rt = self.args, self.s, self.rt
        rt.synchronize()
        t0 = time.time()
        micro_batches = [next(self.train_loader) for _ in range(s.grad_accum_steps)]
        scale, step_tokens = step_loss_scale(micro_batches, rt.world_size, rt.ddp)
        loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
        for x, y in micro_batches:
            micro_loss = self.train_model(x, y, loss_reduction="sum")
            loss_sum += micro_loss.detach().float()
            training.backward(micro_loss * scale, self.scaler)
        if rt.ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        self.data_done = self.every_rank_exhausted()
        train_loss = loss_sum.item() / max(1, step_tokens)
        training.check_finite_loss(train_loss, self.step)
        # the LR of this update follows the progress made before it (so the last update is not wasted at lr 0)
        lrm = progress_lr_multiplier(self.progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        if args.num_iterations > 0:
            self.progress = (self.step + 1) / args.num_iterations
        else:
            self.progress = max(self.progress, min(1.0, self.train_loader.progress))
        set_schedule(self.optimizer, lrm, linear_ramp(self.step, 0.85, 0.95, 300))
        optimizer_step(self.optimizer, self.scaler, rt.ddp)
        self.model.zero_grad(set_to_none=True)
        rt.synchronize()
        self.step += 1
        self.trained_tokens += step_tokens
        self.meter.update(train_loss, time.time() - t0, s.total_batch_size, self.step)
        return lrm, step_tokens

    def every_rank_exhausted(self):
        """Whether every rank has used up its share of the epoch: a rank that runs out first keeps stepping on
        all-padding batches (zero loss) until the others are done, so all stop at the same step."""
        if not self.rt.ddp:
            return self.train_loader.exhausted
        done = torch.tensor(int(self.train_loader.exhausted), device=self.rt.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def log_step(self, lrm, step_tokens, flops_so_far):
        args, meter, step = self.args, self.meter, self.step
        if args.num_iterations > 0:
            counter, steps_left = f"{step:05d}/{args.num_iterations:05d}", args.num_iterations - step
        else:  # one epoch: the steps left at this run's pace through it
            counter, steps_left = f"{step:05d}", step * (1 - self.progress) / self.progress if self.progress > 0 else None
        eta = meter.eta(steps_left) if steps_left is not None else None
        epoch = self.train_loader.epoch
        print0(meter.line(counter, 100 * self.progress, lrm, epoch, eta, extra={"trained tok": f"{step_tokens:,}"}))
        self.report.log_point("train loss", step, meter.loss, section=self.s.report_section)
        if step % 10 == 0:
            self.wandb_run.log({"step": step, "total_training_flops": flops_so_far, **meter.wandb_metrics(),
                                "train/lrm": lrm, "train/epoch": epoch})

    def finish(self):
        """Summary lines, the report section; returns what callers and tests look at."""
        args, s = self.args, self.s
        if self.rt.device_type == "cuda":
            print0(f"Peak memory usage: {training.peak_memory_mib('cuda'):.2f}MiB")
        print0(f"Minimum validation bpb: {self.min_val_bpb:.4f}")
        summary = training.fine_tuning_summary(s.start, args.source, self.step, self.meter, self.rt.world_size)
        self.report.log(section=s.report_section, data=[
            vars(args),
            {**summary, "Training mixture": self.mixture_desc, "Training conversations": len(self.train_ds),
             "Validation conversations": len(self.val_ds), "Trained tokens": self.trained_tokens},
            {"Minimum validation bpb": self.min_val_bpb, "Final validation bpb": self.val_bpb},
            self.chat_results,
        ])
        self.wandb_run.finish()
        return {"step": self.step, "val_bpb": self.val_bpb, "min_val_bpb": self.min_val_bpb,
                "output_dir": s.start.output_dir, "consumed": self.train_loader.consumed,
                "trained_tokens": self.trained_tokens, "chat": self.chat_results}


def main(argv=None):
    args = parse_args(argv)
    return training.run_to_the_end(lambda: SFTRun(args), args.push_wait)


if __name__ == "__main__":
    exit_on_user_error(main)
