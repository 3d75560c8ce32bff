"""
Direct Preference Optimization (DPO): teach a chat model to prefer the `chosen` answer of each pair over the
`rejected` one, relative to a frozen reference (the model as it was at the start).

    python -m scripts.chat_dpo --train-jsonl pairs.jsonl --val-jsonl val_pairs.jsonl
    python -m scripts.chat_dpo --source base --train-jsonl a.jsonl --train-jsonl b.jsonl --precompute-ref
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_dpo -- --train-jsonl pairs.jsonl --run=dpo
    python -m scripts.chat_dpo --train-jsonl pairs.jsonl --resume-from-step 40     # same flags, same world size

Pairs are JSONL in TRL's standard ({"prompt": str, "chosen": str, "rejected": str}) or conversational (message
lists) form (nanochat/dpo.py); a bad row stops the run before training with file:line. Make pairs from a model's
own answers with scripts.make_dpo_pairs. Each pair is cut to --max-seq-len keeping the prompt's start; a pair whose
prompt alone fills the context is dropped (counted). Chosen and rejected rows go through one forward.

The reference: a frozen copy of the starting model, or with --precompute-ref one no-grad pass over every pair
before training (no second model while training). Loss and metrics are TRL's (nanochat/dpo.py): `loss`,
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`
(wandb: train/... and eval/...). The last stdout line is one JSON object: the final validation metrics under those
names, plus "step" and "epoch".

A step's pairs follow from its number (a seeded shuffle per epoch), so a resumed run (weights + optimizer state +
step) trains exactly like the uninterrupted one, and N ranks like one.
Checkpoints: $NANOCHAT_BASE_DIR/chatdpo_checkpoints/<tag>/ (load_model("dpo"), chat_cli/chat_eval -i dpo).
"""

import argparse
import copy
import json
import random
import time
from dataclasses import asdict, dataclass

import torch

from nanochat import training
from nanochat.checkpoint_manager import build_model
from nanochat.cli import (add_lr_arguments, add_run_arguments, add_start_arguments, ArgumentParser,
                          exit_on_user_error, float_above, float_at_least, fraction, int_at_least, UserError)
from nanochat.common import print0, warn_if_cpu_is_busy
from nanochat.dpo import (LOSS_TYPES, collate_pairs, dpo_loss, dpo_metric_sums, load_pairs_jsonl, mean_dpo_metrics,
                          pair_logps, render_pair)
from nanochat.hub import CheckpointPusher
from nanochat.optim import optimizer_step, set_schedule
from nanochat.remote import add_push_arguments
from nanochat.report import get_report
from nanochat.training import MUON_MOMENTUM, ManualGC, progress_lr_multiplier

METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def build_parser():
    parser = ArgumentParser(description="Direct Preference Optimization (DPO) of a nanochat model",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(parser)
    add_start_arguments(parser, "sft", "which checkpoints the policy (and the reference) start from")
    # data
    parser.add_argument("--train-jsonl", type=str, action="append", default=[], metavar="PATH",
                        help="preference pairs to train on (repeatable; required)")
    parser.add_argument("--val-jsonl", type=str, action="append", default=[], metavar="PATH",
                        help="held-out preference pairs (repeatable; default: the training pairs)")
    parser.add_argument("--max-seq-len", type=int_at_least(2), default=None,
                        help="tokens per row, prompt + completion (default: the model's context)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the per-epoch shuffle of the training pairs")
    # DPO
    parser.add_argument("--beta", type=float_above(0), default=0.1, help="DPO's beta: how far the policy may move from the reference")
    parser.add_argument("--loss-type", type=str, default="sigmoid", choices=LOSS_TYPES,
                        help="sigmoid (DPO), ipo, hinge")
    parser.add_argument("--label-smoothing", type=float_at_least(0), default=0.0,
                        help="sigmoid only: the assumed chance a label is flipped (conservative DPO)")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="compute the reference log-probs once before training instead of keeping a frozen copy")
    # horizon and batch
    parser.add_argument("--num-epochs", type=int_at_least(1), default=1, help="passes over the training pairs")
    parser.add_argument("--num-iterations", type=int_at_least(-1), default=-1, help="optimizer steps (-1 = from --num-epochs)")
    parser.add_argument("--pairs-per-step", type=int_at_least(1), default=8, help="pairs per optimizer step, over all ranks")
    parser.add_argument("--device-batch-size", type=int_at_least(1), default=4, help="pairs per forward/backward (2 rows each)")
    # optimization (None = inherit from the source checkpoint)
    add_lr_arguments(parser)
    parser.add_argument("--init-lr-frac", type=float_above(0), default=0.02,
                        help="initial LR as a fraction of the source's LRs (small: DPO nudges a trained model)")
    parser.add_argument("--warmup-ratio", type=fraction, default=0.0, help="fraction of training for LR warmup")
    parser.add_argument("--warmdown-ratio", type=fraction, default=1.0,
                        help="fraction of training for the linear LR decay (1.0: from the start, as TRL's default)")
    parser.add_argument("--final-lr-frac", type=fraction, default=0.0, help="final LR as a fraction of the initial LR")
    # evaluation and saving
    parser.add_argument("--eval-every", type=int_at_least(-1), default=20, help="validate every N steps (-1 = start and end only)")
    parser.add_argument("--save-every", type=int_at_least(-1), default=-1, help="also save every N steps (-1 = only at the end)")
    add_push_arguments(parser)
    return parser


def load_pair_files(paths):
    """Every pair of every file, or one ValueError naming each bad row as path:line (all files checked)."""
    pairs, problems = [], []
    for path in paths:
        try:
            pairs += load_pairs_jsonl(path)
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))
    return pairs


def render_pairs(tokenizer, pairs, max_seq_len, what):
    """Rendered pairs that leave a completion token to score; prints what was dropped or cut."""
    rendered = [render_pair(tokenizer, pair, max_seq_len) for pair in pairs]
    kept = [r for r in rendered if r is not None]
    truncated = sum(r[2] for r in kept)
    print0(f"{what} pairs: {len(kept):,} kept, {len(rendered) - len(kept):,} dropped (the prompt fills the "
           f"{max_seq_len}-token context), {truncated:,} with a completion cut to fit")
    return kept, {"pairs": len(kept), "dropped_long_prompt": len(rendered) - len(kept), "truncated": truncated}

# -----------------------------------------------------------------------------
# Settings: resolved once from the flags and the start checkpoint, read-only afterwards


@dataclass(frozen=True)
class Settings:
    start: training.StartPoint
    max_seq_len: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    grad_accum_steps: int
    user_config: dict

    @property
    def resuming(self):
        return self.start.resuming


def resolve_settings(args, world_size):
    """Settings from the flags and the start checkpoint's meta (read before any weights are loaded)."""
    per_micro_step = args.device_batch_size * world_size
    if args.pairs_per_step % per_micro_step:
        raise UserError(f"--pairs-per-step {args.pairs_per_step} must be a multiple of --device-batch-size "
                         f"{args.device_batch_size} x {world_size} rank(s) = {per_micro_step}")
    start = training.resolve_start(args.source, args.model_tag, args.model_step, "dpo", args.output_tag,
                                   args.resume_from_step)
    source_user_config = start.meta.get("user_config") or {}
    model_seq_len = start.meta["model_config"]["sequence_len"]
    inherited = training.inherit_settings([
        ("max_seq_len", args.max_seq_len, model_seq_len, model_seq_len),  # the model's context
        ("embedding_lr", args.embedding_lr, source_user_config.get("embedding_lr"), 0.3),
        ("unembedding_lr", args.unembedding_lr, source_user_config.get("unembedding_lr"), 0.004),
        ("matrix_lr", args.matrix_lr, source_user_config.get("matrix_lr"), 0.02),
    ])
    if inherited["max_seq_len"] > model_seq_len:
        raise UserError(f"--max-seq-len {inherited['max_seq_len']} is longer than the model's context "
                         f"({model_seq_len})")
    return Settings(start=start, grad_accum_steps=args.pairs_per_step // per_micro_step,
                    user_config={**vars(args), **inherited}, **inherited)


# -----------------------------------------------------------------------------
# The run: setup (__init__) -> loop (run: evaluate, save, one optimization step, log) -> summary (finish)

class DPORun:
    """One DPO run; main() shows its shape."""

    def __init__(self, args, train_pairs, val_pairs):
        self.args = args
        self.rt = rt = training.init_runtime(args.device_type)
        self.wandb_run = training.init_wandb(args.run, "nanochat-dpo", vars(args).copy(), rt.master)
        if rt.device_type == "cpu":
            warn_if_cpu_is_busy()
        self.s = s = resolve_settings(args, rt.world_size)
        self.pusher = CheckpointPusher(args.push_to)
        self.model, self.tokenizer, _ = build_model(s.start.start_dir, s.start.start_step, rt.device, phase="train")
        self.train_rows, self.train_stats = render_pairs(self.tokenizer, train_pairs, s.max_seq_len, "Training")
        self.val_rows, self.val_stats = render_pairs(self.tokenizer, val_pairs, s.max_seq_len, "Validation")
        if not self.train_rows or not self.val_rows:
            raise UserError(f"no pair fits --max-seq-len {s.max_seq_len}; raise it or shorten the prompts")
        self.num_steps = args.num_iterations if args.num_iterations > 0 else \
            max(1, len(self.train_rows) * args.num_epochs // args.pairs_per_step)
        self.setup_reference()
        self.optimizer = self.setup_optimizer()
        self.scaler = training.make_grad_scaler()
        training.check_run_can_save(s.start.output_dir, self.model, self.optimizer, rt)
        self.report = get_report()
        loop = s.start.meta["loop_state"] if s.resuming else {}
        self.step = self.start_step = loop.get("step", 0)
        self.val_metrics = loop.get("val_metrics", {})
        self.first_val_metrics = loop.get("first_val_metrics", {})
        self.meter = training.resumed_meter(loop, self.model.estimate_flops(), rt)
        self.epoch_orders = {}

    def setup_reference(self):
        """The frozen reference: the source checkpoint's weights (this run's start, unless resuming). Kept as a
        copy, or with --precompute-ref turned into log-prob tables for every pair and dropped."""
        s, rt = self.s, self.rt
        if s.resuming:
            reference, _, _ = build_model(s.start.source_dir, s.start.source_step, rt.device, phase="eval")
        else:
            reference = copy.deepcopy(self.model).eval()
        reference.requires_grad_(False)
        self.reference, self.reference_tables = reference, None
        if self.args.precompute_ref:
            t0 = time.time()
            self.reference_tables = {"train": self.precompute(self.train_rows), "val": self.precompute(self.val_rows)}
            self.reference = None  # the policy trains alone from here
            print0(f"Reference log-probs of {len(self.train_rows) + len(self.val_rows):,} pairs precomputed "
                   f"({time.time() - t0:.1f}s)")

    @torch.no_grad()
    def precompute(self, rows):
        """(chosen, rejected) reference log-probs of every rendered pair, each (pairs,), in one no-grad pass."""
        chosen, rejected = [], []
        for start in range(0, len(rows), self.args.device_batch_size):
            inputs, targets = collate_pairs(rows[start:start + self.args.device_batch_size],
                                            self.tokenizer.get_bos_token_id(), self.rt.device)
            c, r, _, _ = pair_logps(self.reference, inputs, targets)
            chosen.append(c)
            rejected.append(r)
        return torch.cat(chosen), torch.cat(rejected)

    @torch.no_grad()
    def reference_logps(self, split, indices, inputs, targets):
        if self.reference_tables is not None:
            chosen, rejected = self.reference_tables[split]
            index = torch.tensor(indices, device=chosen.device)
            return chosen[index], rejected[index]
        c, r, _, _ = pair_logps(self.reference, inputs, targets)
        return c, r

    def setup_optimizer(self):
        args, s = self.args, self.s
        optimizer = self.model.setup_optimizer(unembedding_lr=s.unembedding_lr, embedding_lr=s.embedding_lr,
                                               matrix_lr=s.matrix_lr, weight_decay=args.weight_decay)
        if s.resuming:
            training.warm_start_optimizer(optimizer, s.start.start_dir, s.start.start_step, self.rt, required=True)
        training.scale_learning_rates(optimizer, args.init_lr_frac)
        return optimizer

    def run(self):
        args = self.args
        with ManualGC() as manual_gc:
            while True:
                last_step = self.step >= self.num_steps
                self.evaluate(last_step)
                if training.is_save_step(self.step, self.start_step, args.save_every, last_step):
                    self.save()
                if last_step:
                    break
                lrm, metrics = self.train_step()
                self.log_step(lrm, metrics)
                manual_gc.after_step(self.step)

    # -------------------------------------------------------------------------
    # batches and one optimization step

    def step_pairs(self):
        """This rank's training pairs of the current step: its contiguous block of positions step*P .. step*P + P
        in the endless sequence of per-epoch shuffles. With W ranks, rank r's block is what one rank's micro-batches
        r*P/W .. would hold: the same pairs in the same forwards whatever the world size."""
        n, per_step = len(self.train_rows), self.args.pairs_per_step
        per_rank = per_step // self.rt.world_size
        first = self.step * per_step + self.rt.rank * per_rank
        return [self.epoch_order(p // n)[p % n] for p in range(first, first + per_rank)]

    def epoch_order(self, epoch):
        if epoch not in self.epoch_orders:
            order = list(range(len(self.train_rows)))
            random.Random(self.args.seed + epoch).shuffle(order)
            self.epoch_orders = {epoch: order}  # one epoch at a time is all a step needs
        return self.epoch_orders[epoch]

    def pair_batch_metrics(self, split, rows, indices):
        """One forward of pairs `indices` -> (per-pair losses, metric sums); policy log-probs with autograd
        when it is on."""
        args = self.args
        inputs, targets = collate_pairs([rows[i] for i in indices], self.tokenizer.get_bos_token_id(), self.rt.device)
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(self.model, inputs, targets)
        ref_chosen, ref_rejected = self.reference_logps(split, indices, inputs, targets)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        return losses, dpo_metric_sums(losses, chosen_rewards, rejected_rewards, chosen, rejected), int(inputs.numel())

    def train_step(self):
        """One optimization step over --pairs-per-step pairs; the loss is their mean. Returns (LR multiplier,
        the step's TRL metrics)."""
        args, rt = self.args, self.rt
        rt.synchronize()
        t0 = time.time()
        mine = self.step_pairs()
        scale = rt.world_size / args.pairs_per_step  # the optimizer averages the ranks' gradients
        sums, tokens = dict.fromkeys(METRIC_NAMES + ("pairs",), 0), 0
        for start in range(0, len(mine), args.device_batch_size):
            losses, batch_sums, batch_tokens = self.pair_batch_metrics("train", self.train_rows,
                                                                       mine[start:start + args.device_batch_size])
            training.backward(losses.sum() * scale, self.scaler)
            sums = {k: sums[k] + v for k, v in batch_sums.items()}
            tokens += batch_tokens
        metrics = mean_dpo_metrics(training.sum_over_ranks(sums, rt))
        training.check_finite_loss(metrics["loss"], self.step)
        lrm = progress_lr_multiplier(self.step / self.num_steps, args.warmup_ratio, args.warmdown_ratio,
                                     args.final_lr_frac)
        set_schedule(self.optimizer, lrm, MUON_MOMENTUM)
        optimizer_step(self.optimizer, self.scaler, rt.ddp)
        self.model.zero_grad(set_to_none=True)
        rt.synchronize()
        self.step += 1
        self.meter.update(metrics["loss"], time.time() - t0, tokens * rt.world_size, self.step)
        return lrm, metrics

    # -------------------------------------------------------------------------
    # evaluation, logging, saving

    @torch.no_grad()
    def validate(self):
        """TRL's metrics over every validation pair (rank-strided, summed over ranks)."""
        mine = list(range(self.rt.rank, len(self.val_rows), self.rt.world_size))
        sums = dict.fromkeys(METRIC_NAMES + ("pairs",), 0)  # every rank sends every key, even with no pair
        for start in range(0, len(mine), self.args.device_batch_size):
            _, batch_sums, _ = self.pair_batch_metrics("val", self.val_rows, mine[start:start + self.args.device_batch_size])
            sums = {k: sums[k] + v for k, v in batch_sums.items()}
        return mean_dpo_metrics(training.sum_over_ranks(sums, self.rt))

    def evaluate(self, last_step):
        args, step = self.args, self.step
        resumed_here = self.s.resuming and step == self.start_step  # the resumed run validated this step already
        if resumed_here or not (last_step or step == 0 or (args.eval_every > 0 and step % args.eval_every == 0)):
            return
        self.val_metrics = self.validate()
        if not self.first_val_metrics:
            self.first_val_metrics = dict(self.val_metrics)
        print0(f"Step {step:05d} | validation: " + ", ".join(f"{k}: {v:.4f}" for k, v in self.val_metrics.items()))
        for name in ("loss", "rewards/accuracies", "rewards/margins"):
            self.report.log_point(f"val {name}", step, self.val_metrics[name], section="Chat DPO")
        self.wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in self.val_metrics.items()}})

    def epoch(self):
        return self.step * self.args.pairs_per_step / len(self.train_rows)

    def log_step(self, lrm, metrics):
        meter, step = self.meter, self.step
        extra = {"acc": f"{metrics['rewards/accuracies']:.2f}", "margin": f"{metrics['rewards/margins']:.4f}"}
        print0(meter.line(f"{step:05d}/{self.num_steps:05d}", 100 * step / self.num_steps, lrm, f"{self.epoch():.2f}",
                          meter.eta(self.num_steps - step), extra=extra))
        self.report.log_point("train loss", step, metrics["loss"], section="Chat DPO")
        self.wandb_run.log({"step": step, "train/lrm": lrm, **{f"train/{k}": v for k, v in metrics.items()},
                            **{k: v for k, v in meter.wandb_metrics().items() if k != "train/loss"}})

    def save(self):
        s, rt, args = self.s, self.rt, self.args
        number = s.start.step_offset + self.step
        meta = training.checkpoint_meta(
            number, None, asdict(self.model.config), s.user_config, args.device_batch_size, s.max_seq_len, None,
            tokenizer=self.tokenizer, **training.fine_tuning_state(
                s.start, args.source, self.step, self.num_steps, self.meter, val_metrics=self.val_metrics,
                first_val_metrics=self.first_val_metrics))
        training.save_run_checkpoint(s.start, self.step, self.model, self.optimizer, meta, rt.rank, self.pusher)

    def finish(self):
        """Summary lines, the report section and, last, the final validation metrics as one JSON line."""
        args, s = self.args, self.s
        number = s.start.step_offset + self.step
        summary = training.fine_tuning_summary(s.start, args.source, self.step, self.meter, self.rt.world_size)
        self.report.log(section="Chat DPO", data=[
            vars(args),
            {**summary, "Reference": "precomputed" if args.precompute_ref else "frozen copy",
             "Training pairs": len(self.train_rows), "Validation pairs": len(self.val_rows),
             "Pairs dropped (prompt fills the context)": self.train_stats["dropped_long_prompt"]
             + self.val_stats["dropped_long_prompt"]},
            {f"val {k} before": v for k, v in self.first_val_metrics.items()},
            {f"val {k} after": v for k, v in self.val_metrics.items()},
        ])
        self.wandb_run.finish()
        final = {**self.val_metrics, "step": number, "epoch": round(self.epoch(), 4)}
        print0(json.dumps(final))
        return {**final, "output_dir": s.start.output_dir, "first_val_metrics": self.first_val_metrics}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.train_jsonl:
        raise UserError("give the training pairs with --train-jsonl PATH")
    try:
        train_pairs = load_pair_files(args.train_jsonl)
        val_pairs = load_pair_files(args.val_jsonl) if args.val_jsonl else train_pairs
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.val_jsonl:
        print0("NOTE: no --val-jsonl: the validation metrics are measured on the training pairs")
    return training.run_to_the_end(lambda: DPORun(args, train_pairs, val_pairs), args.push_wait)


if __name__ == "__main__":
    exit_on_user_error(main)
