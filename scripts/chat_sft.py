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

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import gc
import time
import argparse
import dataclasses
from importlib import resources

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, DummyWandb, get_base_dir, get_peak_flops,
                             autodetect_device_type, COMPUTE_DTYPE)
from nanochat.optim import optimizer_step, set_schedule

# -----------------------------------------------------------------------------
# CLI

# --preset midtrain: the settings of nanochat's scripts/mid_train.py (before it was folded into SFT):
# fixed LRs, train on every token (not just the assistant's), best-fit-crop packing, flat LR then a linear
# decay over the last 20%, fresh optimizer, its own mixture, checkpoints under mid_checkpoints/.
MIDTRAIN_DEFAULTS = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, init_lr_frac=1.0,
                         warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, eval_every=150,
                         eval_tokens=20 * 524288, chatcore_every=-1, load_optimizer=0, packing="crop",
                         loss_on="all")


def build_parser():
    parser = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) of a nanochat model",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # logging / runtime
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--preset", type=str, default="sft", choices=["sft", "midtrain"],
                        help="sft: the reference SFT; midtrain: nanochat's older midtraining stage (its mixture, "
                             "LRs and schedule, loss on all tokens, output to mid_checkpoints/)")
    # model loading
    parser.add_argument("--source", type=str, default="base", choices=["base", "mid", "sft", "rl", "dpo"],
                        help="which checkpoints to start from")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag to load from (default: largest d<N>)")
    parser.add_argument("--model-step", type=int, default=None, help="model step to load from (default: last)")
    parser.add_argument("--output-tag", type=str, default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--load-optimizer", type=int, default=1,
                        help="warm-start the optimizer from the source checkpoint's shard (0=no, 1=yes)")
    parser.add_argument("--resume-from-step", type=int, default=-1,
                        help="resume this run from its checkpoint at this step (same flags, same world size)")
    # horizon
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimization steps (-1 = one full epoch)")
    # batch sizes (None = inherit from the source checkpoint)
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: inherit)")
    parser.add_argument("--device-batch-size", type=int, default=None, help="rows per device (default: inherit)")
    parser.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: inherit)")
    # optimization (None = inherit from the source checkpoint)
    parser.add_argument("--embedding-lr", type=float, default=None, help="LR of the embeddings (default: inherit)")
    parser.add_argument("--unembedding-lr", type=float, default=None, help="LR of lm_head (default: inherit)")
    parser.add_argument("--matrix-lr", type=float, default=None, help="LR of the Muon matrices (default: inherit)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the Muon matrices")
    parser.add_argument("--init-lr-frac", type=float, default=0.8, help="initial LR as a fraction of the base LR")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of training for LR warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of training for LR warmdown")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="final LR as a fraction of the initial LR")
    # evaluation
    parser.add_argument("--eval-every", type=int, default=200, help="val bpb every N steps (-1 = only at the end)")
    parser.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens to evaluate val bpb on")
    parser.add_argument("--chatcore-every", type=int, default=200,
                        help="chat eval every N steps and at the end (-1 = never): ChatCORE's six tasks, or "
                             "SpellingBee + Arithmetic with the offline mixture")
    parser.add_argument("--chatcore-max-cat", type=int, default=-1, help="max problems per categorical task")
    parser.add_argument("--chatcore-max-sample", type=int, default=24, help="max problems per generative task")
    parser.add_argument("--save-every", type=int, default=-1, help="also save every N steps (-1 = only at the end)")
    # data
    parser.add_argument("--mmlu-epochs", type=int, default=3, help="epochs of MMLU auxiliary_train in the mixture")
    parser.add_argument("--gsm8k-epochs", type=int, default=4, help="epochs of GSM8K train in the mixture")
    parser.add_argument("--identity-epochs", type=int, default=2, help="epochs of the identity conversations")
    parser.add_argument("--identity-jsonl", type=str, default=None,
                        help="identity conversations (default: $NANOCHAT_BASE_DIR/identity_conversations.jsonl "
                             "if present, else the persona file shipped with nanochat)")
    parser.add_argument("--offline", action="store_true",
                        help="offline mixture: identity, SimpleSpelling/SpellingBee (offline words), procedural "
                             "arithmetic with calculator calls (also used automatically when the hub is unreachable)")
    parser.add_argument("--offline-size", type=int, default=20000,
                        help="offline mixture: rows of each procedural task (SimpleSpelling, SpellingBee, Arithmetic)")
    parser.add_argument("--extra-train-jsonl", type=str, action="append", default=[], metavar="PATH[:REPEAT]",
                        help="add your conversations (JSONL) to the training mixture, REPEAT times (repeatable)")
    parser.add_argument("--extra-val-jsonl", type=str, action="append", default=[], metavar="PATH",
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
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset == "midtrain":  # preset values become the defaults; explicit flags still win
        parser.set_defaults(**MIDTRAIN_DEFAULTS)
        args = parser.parse_args(argv)
    return args


# -----------------------------------------------------------------------------
# Data: mixtures

def default_identity_path():
    user_file = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    if os.path.exists(user_file):
        return user_file
    return str(resources.files("nanochat").joinpath("data", "identity_conversations.jsonl"))


def parse_jsonl_spec(spec):
    """'path' or 'path:REPEAT' -> (path, repeat). A ':' that is part of the path (C:\\x) is left alone."""
    path, repeat = spec, 1
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        path, repeat = head, int(tail)
    if repeat < 1:
        raise ValueError(f"--extra-train-jsonl {spec}: REPEAT must be >= 1")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--extra-*-jsonl: {path} does not exist")
    return path, repeat


def load_custom(path):
    """A user's JSONL as a CustomJSON task; bad rows are reported as path:line: reason (nothing trains on them)."""
    from tasks.customjson import CustomJSON
    try:
        return CustomJSON(filepath=path)
    except ValueError as e:
        raise SystemExit(f"ERROR: {path} has malformed conversations, fix them first:\n{e}") from None


def hub_mixture(args, identity_path):
    """The reference mixture (hub data, or local copies via NANOCHAT_TASK_DATA*). Raises TaskDataUnavailable."""
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    from tasks.customjson import CustomJSON
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
    from tasks.arithmetic import Arithmetic
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    from tasks.customjson import CustomJSON
    n = args.offline_size
    identity = CustomJSON(filepath=identity_path)
    train = [*[identity] * args.identity_epochs, SimpleSpelling(size=n, split="train"),
             SpellingBee(size=n, split="train"), Arithmetic(size=n, split="train")]
    val = [SimpleSpelling(size=200, split="test"), SpellingBee(size=200, split="test"),
           Arithmetic(size=200, split="test")]
    return train, val


def build_mixtures(args):
    """(train TaskMixture, val TaskMixture, description, offline?)"""
    from tasks.common import TaskMixture
    from tasks.hub import TaskDataUnavailable
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
            raise SystemExit("ERROR: --custom-only needs at least one --extra-train-jsonl PATH[:REPEAT]")
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
        raise SystemExit("ERROR: the training or validation mixture is empty (empty JSONL files?)")
    return train_ds, val_ds, what, offline


# -----------------------------------------------------------------------------
# Data: packing conversations into rows

class ConversationPacker:
    """
    Yields (inputs, targets) of shape (B, T). Every row starts at the <|bos|> of a conversation; the largest
    buffered conversation that still fits is added until none does, then the rest of the row is padded
    (packing="pad", nothing is ever cropped) or filled with the start of the oldest buffered one ("crop").
    Targets are -1 where the render mask is 0 (user turns, tool outputs, padding) when loss_on="assistant".
    Conversations longer than T+1 tokens are truncated to T+1 when rendered, so every one fits a row.

    Rank r reads conversations r, r+W, r+2W, ... With stop_at_epoch_end, each conversation is used exactly
    once and `exhausted` turns True once the last one is packed (later batches are all padding); otherwise
    the data loops over epochs. state_dict() / resume_state restore the exact stream (the buffered
    conversations are re-rendered from their indices).
    """

    def __init__(self, dataset, tokenizer, batch_size, seq_len, device, rank=0, world_size=1, packing="pad",
                 loss_on="assistant", stop_at_epoch_end=False, buffer_size=100, resume_state=None):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T = batch_size, seq_len
        self.device = device
        self.world_size = world_size
        self.packing, self.loss_on = packing, loss_on
        self.stop_at_epoch_end = stop_at_epoch_end
        self.buffer_size = buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch, self.consumed = rank, 1, 0
        self.buffer = []  # (dataset index, ids, mask)
        if resume_state is not None:
            self.cursor, self.epoch, self.consumed = resume_state["cursor"], resume_state["epoch"], resume_state["consumed"]
            self.buffer = [self._render(i) for i in resume_state["buffer"]]

    def state_dict(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "buffer": [i for i, _, _ in self.buffer]}

    @property
    def exhausted(self):
        return self.stop_at_epoch_end and self.cursor >= len(self.dataset) and not self.buffer

    @property
    def progress(self):
        """Fraction of one epoch consumed (all ranks together, assuming they move in step)."""
        return self.consumed * self.world_size / len(self.dataset)

    def _render(self, index):
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.T + 1)
        if self.loss_on == "all":
            mask = [0] + [1] * (len(ids) - 1)  # every next token (the leading <|bos|> is never a target)
        return index, ids, mask

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= len(self.dataset):
                if self.stop_at_epoch_end:
                    return
                self.cursor %= len(self.dataset)
                self.epoch += 1
            self.buffer.append(self._render(self.cursor))
            self.cursor += self.world_size

    def _take(self, i):
        self.consumed += 1
        return self.buffer.pop(i)

    def next_rows(self):
        """Lists of (ids, mask) rows of exactly T+1 tokens."""
        capacity = self.T + 1
        rows = []
        for _ in range(self.B):
            ids, mask = [], []
            while len(ids) < capacity:
                self._refill()
                if not self.buffer:
                    break  # end of the epoch: pad the rest
                remaining = capacity - len(ids)
                best = max((k for k in range(len(self.buffer)) if len(self.buffer[k][1]) <= remaining),
                           key=lambda k: len(self.buffer[k][1]), default=None)
                if best is not None:
                    _, conv_ids, conv_mask = self._take(best)
                    ids += conv_ids
                    mask += conv_mask
                elif self.packing == "crop":
                    _, conv_ids, conv_mask = self._take(0)
                    ids += conv_ids[:remaining]
                    mask += conv_mask[:remaining]
                else:
                    break
            pad = capacity - len(ids)
            rows.append((ids + [self.bos] * pad, mask + [0] * pad))
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = self.next_rows()
        ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
        mask = torch.tensor([m for _, m in rows], dtype=torch.bool)
        inputs = ids[:, :-1]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        use_cuda = self.device.type == "cuda" if isinstance(self.device, torch.device) else str(self.device).startswith("cuda")
        if use_cuda:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return (inputs.to(self.device, non_blocking=use_cuda).contiguous(),
                targets.to(self.device, non_blocking=use_cuda).contiguous())


# -----------------------------------------------------------------------------
# Training math

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


def lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, linear warmdown to final_lr_frac, over progress 0 -> 1."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if warmdown_ratio <= 0 or progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min(1.0, (progress - (1.0 - warmdown_ratio)) / warmdown_ratio)
    return (1 - decay) + decay * final_lr_frac


def muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def resolve_inherited(args, meta):
    """Fill None batch sizes / LRs from the source checkpoint's meta (printing where each value came from)."""
    source_user_config = meta.get("user_config") or {}
    model_seq_len = (meta.get("model_config") or {}).get("sequence_len", 2048)
    for name, fallback, source in [
        ("max_seq_len", model_seq_len, meta),
        ("device_batch_size", 32, meta),
        ("total_batch_size", 524288, meta),
        ("embedding_lr", 0.3, source_user_config),
        ("unembedding_lr", 0.004, source_user_config),
        ("matrix_lr", 0.02, source_user_config),
    ]:
        arg_val, source_val = getattr(args, name), source.get(name)
        if arg_val is None:
            resolved = source_val if source_val is not None else fallback
            setattr(args, name, resolved)
            origin = "the source checkpoint" if source_val is not None else "the default (not in the checkpoint)"
            print0(f"Inherited {name}={resolved} from {origin}")
        elif source_val is not None and arg_val != source_val:
            print0(f"NOTE: --{name.replace('_', '-')}={arg_val} overrides the source checkpoint's value of {source_val}")
        else:
            print0(f"Using {name}={arg_val}")


def run_chat_evals(model, tokenizer, offline, args):
    """{task: accuracy} on the ChatCORE tasks (or the offline ones), plus ChatCORE when all six ran."""
    from nanochat.engine import Engine
    from scripts.chat_eval import run_chat_eval, ALL_TASKS, BASELINES, centered
    engine = Engine(model, tokenizer)
    names = ["SpellingBee", "Arithmetic"] if offline else ALL_TASKS
    results = {}
    for name in names:
        categorical = name in ("ARC-Easy", "ARC-Challenge", "MMLU")
        limit = args.chatcore_max_cat if categorical else args.chatcore_max_sample
        results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=args.device_batch_size,
                                      max_new_tokens=min(512, model.config.sequence_len),
                                      max_problems=None if limit < 0 else limit)
    if all(n in results for n in ALL_TASKS):
        results["ChatCORE"] = sum(centered(results[n], BASELINES[n]) for n in ALL_TASKS) / len(ALL_TASKS)
    return results


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    phase_dir = "mid_checkpoints" if args.preset == "midtrain" else "chatsft_checkpoints"
    section = "Midtraining" if args.preset == "midtrain" else "Chat SFT"

    from nanochat.checkpoint_manager import (CHECKPOINT_DIRS, build_model, load_checkpoint, save_checkpoint,
                                             find_largest_model, find_last_step, available_steps)
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    from nanochat.report import get_report

    device_type = args.device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type)
    master = rank == 0
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    peak_flops = get_peak_flops(torch.cuda.get_device_name(0)) if device_type == "cuda" else 0.0
    if args.run == "dummy" or not master:
        wandb_run = DummyWandb()
    else:
        try:
            import wandb
        except ImportError:
            raise SystemExit("ERROR: --run needs wandb (pip install wandb), or pass --run dummy") from None
        project = "nanochat-mid" if args.preset == "midtrain" else "nanochat-sft"
        wandb_run = wandb.init(project=project, name=args.run, config=user_config)

    # ---- where we start from
    base_dir = get_base_dir()
    source_root = os.path.join(base_dir, CHECKPOINT_DIRS[args.source])
    source_tag = args.model_tag or find_largest_model(source_root)
    source_dir = os.path.join(source_root, source_tag)
    source_step = args.model_step if args.model_step is not None else find_last_step(source_dir)
    output_tag = args.output_tag or source_tag
    output_dir = os.path.join(base_dir, phase_dir, output_tag)
    # fine-tuning an SFT model into its own directory: number this run's steps after the source's
    step_offset = source_step if os.path.abspath(output_dir) == os.path.abspath(source_dir) else 0
    resuming = args.resume_from_step >= 0
    resume_meta = None
    if resuming:
        print0(f"Resuming from {output_dir} step {args.resume_from_step}")
        model, tokenizer, resume_meta = build_model(output_dir, args.resume_from_step, device, phase="train")
        inherit_meta = resume_meta
        step_offset = resume_meta["loop_state"]["step_offset"]
    else:
        print0(f"Starting from {source_dir} step {source_step}")
        model, tokenizer, inherit_meta = build_model(source_dir, source_step, device, phase="train")
        if step_offset:
            print0(f"NOTE: saving into the source's own directory: this run's checkpoints are numbered from step {step_offset}")
        elif os.path.isdir(output_dir) and available_steps(output_dir):
            print0(f"NOTE: {output_dir} already holds checkpoints at steps {available_steps(output_dir)}; "
                   f"same-numbered ones will be replaced")
    resolve_inherited(args, inherit_meta)

    orig_model = model
    if device_type == "cuda":
        model = torch.compile(model, dynamic=False)
    num_flops_per_token = orig_model.estimate_flops()
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if args.total_batch_size % world_tokens_per_fwdbwd != 0:
        raise SystemExit(
            f"ERROR: --total-batch-size {args.total_batch_size} must be a multiple of device_batch_size x "
            f"max_seq_len x world_size = {args.device_batch_size} x {args.max_seq_len} x {world_size} = "
            f"{world_tokens_per_fwdbwd}. Pass e.g. --total-batch-size {world_tokens_per_fwdbwd} (or a multiple).")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Total batch size {args.total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    token_bytes = get_token_bytes(device=device)

    # ---- optimizer (fresh LRs; momentum buffers optionally from the source or the resumed checkpoint)
    optimizer = orig_model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                           matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    fresh = [{k: g[k] for k in ("lr", "weight_decay")} for g in optimizer.param_groups]
    optim_dir, optim_step = (output_dir, args.resume_from_step) if resuming else (source_dir, source_step)
    if resuming or args.load_optimizer:
        try:
            _, optimizer_data, _ = load_checkpoint(optim_dir, optim_step, device, load_optimizer=True, rank=rank)
            optimizer.load_state_dict(optimizer_data)
            del optimizer_data
            print0(f"Loaded optimizer state from {optim_dir} step {optim_step} (LRs reset to this run's)")
        except FileNotFoundError as e:
            if resuming:
                raise
            print0(f"WARNING: no optimizer state to warm-start from ({str(e).splitlines()[0][:200]}); starting fresh")
    for group, f in zip(optimizer.param_groups, fresh):
        group.update(f)
        group["lr"] = f["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]
    scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None

    # ---- data
    train_ds, val_ds, mixture_desc, offline = build_mixtures(args)
    print0(f"Training mixture ({mixture_desc}): {len(train_ds):,} conversations; validation: {len(val_ds):,}")
    loader_kwargs = dict(tokenizer=tokenizer, batch_size=args.device_batch_size, seq_len=args.max_seq_len,
                         device=device, rank=rank, world_size=world_size, packing=args.packing, loss_on=args.loss_on)
    loader_state = resume_meta["dataloader_state_dicts"][rank] if resuming else None
    train_loader = ConversationPacker(train_ds, stop_at_epoch_end=args.num_iterations <= 0,
                                      resume_state=loader_state, **loader_kwargs)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))

    def evaluate_val():
        model.eval()
        val_loader = ConversationPacker(val_ds, **loader_kwargs)
        try:
            bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        except ValueError as e:  # nothing countable in the val rows (e.g. every answer truncated away)
            print0(f"WARNING: no val bpb: {e}")
            bpb = None
        model.train()
        return bpb

    # ---- loop state
    loop = resume_meta["loop_state"] if resuming else {}
    step = loop.get("step", 0)
    min_val_bpb = loop.get("min_val_bpb", float("inf"))
    smooth_train_loss = loop.get("smooth_train_loss", 0.0)
    total_training_time = loop.get("total_training_time", 0.0)
    progress = loop.get("progress", 0.0)
    val_bpb = loop.get("val_bpb")
    trained_tokens = loop.get("trained_tokens", 0)
    chat_results = {}
    report = get_report()
    ema_beta = 0.9
    data_done = False
    last_step = False
    start_step = step

    def save(at_step):
        loader_states = [train_loader.state_dict()]
        if ddp:
            loader_states = [None] * world_size
            dist.all_gather_object(loader_states, train_loader.state_dict())
        config = dataclasses.asdict(orig_model.config)
        meta = {
            "step": step_offset + at_step,
            "val_bpb": val_bpb,
            "model_config": config,
            "user_config": {**user_config, **{k: getattr(args, k) for k in (
                "max_seq_len", "device_batch_size", "total_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr")}},
            "max_seq_len": args.max_seq_len,
            "device_batch_size": args.device_batch_size,
            "total_batch_size": args.total_batch_size,
            "source": {"kind": args.source, "tag": source_tag, "step": source_step},
            "dataloader_state_dicts": loader_states,
            "loop_state": {"step": at_step, "step_offset": step_offset, "min_val_bpb": min_val_bpb,
                           "smooth_train_loss": smooth_train_loss, "total_training_time": total_training_time,
                           "progress": progress, "val_bpb": val_bpb, "trained_tokens": trained_tokens},
        }
        save_checkpoint(output_dir, step_offset + at_step, orig_model.state_dict(), optimizer.state_dict(), meta,
                        rank=rank)

    while True:
        last_step = data_done or (args.num_iterations > 0 and step >= args.num_iterations)
        flops_so_far = num_flops_per_token * args.total_batch_size * step

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0 and not (resuming and step == start_step)):
            val_bpb = evaluate_val()
            if val_bpb is not None:
                min_val_bpb = min(min_val_bpb, val_bpb)
                print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
                report.log_point("val bpb", step, val_bpb, section=section)
                wandb_run.log({"step": step, "total_training_flops": flops_so_far, "val/bpb": val_bpb})

        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            model.eval()
            t0 = time.time()
            chat_results = run_chat_evals(orig_model, tokenizer, offline, args)
            model.train()
            print0(f"Step {step:05d} | chat eval ({time.time() - t0:.0f}s): " +
                   ", ".join(f"{k}: {v:.4f}" for k, v in chat_results.items()))
            for name, acc in chat_results.items():
                report.log_point(name, step, acc, section=section)
            wandb_run.log({"step": step, **{f"chatcore/{k}": v for k, v in chat_results.items()}})

        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            save(step)
        if last_step:
            break

        # ---- one optimization step
        synchronize()
        t0 = time.time()
        micro_batches = [next(train_loader) for _ in range(grad_accum_steps)]
        scale, step_tokens = step_loss_scale(micro_batches, world_size, ddp)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for x, y in micro_batches:
            micro_loss = model(x, y, loss_reduction="sum")
            loss_sum += micro_loss.detach().float()
            loss = micro_loss * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            done = torch.tensor(int(train_loader.exhausted), device=device)
            dist.all_reduce(done, op=dist.ReduceOp.MIN)  # stop once every rank has used up its share
            data_done = bool(done.item())
        else:
            data_done = train_loader.exhausted
        train_loss = loss_sum.item() / max(1, step_tokens)
        # the LR of this update follows the progress made before it (so the last update is not wasted at lr 0)
        lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        if args.num_iterations > 0:
            progress = (step + 1) / args.num_iterations
        else:
            progress = max(progress, min(1.0, train_loader.progress))
        momentum = muon_momentum(step)
        set_schedule(optimizer, lrm, momentum)
        optimizer_step(optimizer, scaler, ddp)
        model.zero_grad(set_to_none=True)
        synchronize()
        dt = time.time() - t0
        step += 1
        trained_tokens += step_tokens

        # ---- logging
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
        debiased = smooth_train_loss / (1 - ema_beta ** step)  # the EMA has had `step` updates (resume included)
        if step - start_step > 10:
            total_training_time += dt
        tok_per_sec = int(args.total_batch_size / dt)
        mfu = 100 * num_flops_per_token * args.total_batch_size / dt / (peak_flops * world_size) if peak_flops else 0.0
        done_steps = step - start_step
        if args.num_iterations > 0:
            eta = (args.num_iterations - step) * (total_training_time / max(1, done_steps - 10)) if done_steps > 10 else None
        else:
            eta = (1 - progress) / progress * total_training_time if progress > 0 and done_steps > 10 else None
        eta_str = f" | eta: {eta / 60:.1f}m" if eta is not None else ""
        total_str = f"{step:05d}/{args.num_iterations:05d}" if args.num_iterations > 0 else f"{step:05d}"
        print0(f"step {total_str} ({100 * progress:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | trained tok: {step_tokens:,} | "
               f"mfu: {mfu:.2f} | epoch: {train_loader.epoch} | total time: {total_training_time / 60:.2f}m{eta_str}")
        report.log_point("train loss", step, debiased, section=section)
        if step % 10 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "train/loss": debiased,
                           "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                           "train/epoch": train_loader.epoch})
        if step == start_step + 1:
            gc.collect()
            gc.freeze()  # setup's surviving objects never get scanned again: avoids ~0.5 s GC pauses
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    gc.unfreeze()
    gc.enable()  # back to normal (matters when main() is called from Python, e.g. tests)
    if device_type == "cuda":
        print0(f"Peak memory usage: {torch.cuda.max_memory_allocated() / 1024 / 1024:.2f}MiB")
    print0(f"Total training time: {total_training_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.4f}")
    print0(f"Saved to {output_dir} (step {step_offset + step})")
    report.log(section=section, data=[
        user_config,
        {"Source": f"{args.source} {source_tag} step {source_step}", "Output": f"{output_dir} step {step_offset + step}",
         "Training mixture": mixture_desc, "Training conversations": len(train_ds),
         "Validation conversations": len(val_ds), "Number of iterations": step, "Trained tokens": trained_tokens,
         "DDP world size": world_size},
        {"Minimum validation bpb": min_val_bpb, "Final validation bpb": val_bpb,
         "Training time (min)": total_training_time / 60},
        chat_results,
    ])
    wandb_run.finish()
    compute_cleanup()
    return {"step": step, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "output_dir": output_dir,
            "consumed": train_loader.consumed, "trained_tokens": trained_tokens, "chat": chat_results}


if __name__ == "__main__":
    main()
