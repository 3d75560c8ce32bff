"""
Reinforcement learning on a task with a reward (GSM8K by default), from the SFT model: nanochat's simplified
GRPO, i.e. on-policy REINFORCE with the mean reward of a question's samples as the baseline.

    python -m scripts.chat_rl                                    # GSM8K, the reference's settings
    python -m scripts.chat_rl --task Arithmetic --num-iterations 40 --examples-per-step 4 --num-samples 8
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=default
    python -m scripts.chat_rl --resume-from-step 60              # same flags, same world size

Each step: --examples-per-step questions (split over the ranks) x --num-samples completions sampled through the
Engine (tools on); reward from the task (1 when the '#### N' answer is the right number); advantage = reward -
the question's mean reward; loss = -sum(advantage x log p(token)) over the sampled tokens / the step's number of
sampled tokens (prompt, forced tool output and the terminal <|assistant_end|> are not trained). No KL, no ratio
or clipping, LR = base LRs x --init-lr-frac, ramped linearly to zero. pass@1..k on held-out problems every
--eval-every steps. The math is in nanochat/rl.py.

Every sample is seeded from (step, question index, chunk), and a step's questions follow from its number, so a
resumed run (weights + optimizer state + step) samples and trains exactly like the uninterrupted one, and N ranks
like one. Checkpoints: $NANOCHAT_BASE_DIR/chatrl_checkpoints/<tag>/ (model, optimizer shards, meta).
"""

import argparse
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from nanochat import training
from nanochat.checkpoint_manager import build_model
from nanochat.cli import (add_lr_arguments, add_run_arguments, add_start_arguments, ArgumentParser,
                          exit_on_user_error, float_above, float_at_least, int_at_least, UserError)
from nanochat.common import print0, warn_if_cpu_is_busy
from nanochat.engine import Engine
from nanochat.hub import CheckpointPusher
from nanochat.optim import optimizer_step, set_schedule
from nanochat.remote import add_push_arguments
from nanochat.report import get_report
from nanochat.rl import group_advantages, pass_at_k, policy_gradient_loss, rollout_rows, sample_seed
from nanochat.training import MUON_MOMENTUM, ManualGC, progress_lr_multiplier, step_loss_scale
from tasks.arithmetic import Arithmetic
from tasks.gsm8k import GSM8K
from tasks.hub import TaskDataUnavailable
from tasks.spellingbee import SpellingBee

RL_TASKS = ("GSM8K", "Arithmetic", "SpellingBee")
EVAL_SEED_STEP = -1   # evaluation samples are seeded like a step of their own, the same at every evaluation


def build_parser():
    parser = ArgumentParser(description="Reinforcement learning (simplified GRPO) on a task with a reward",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(parser)
    add_start_arguments(parser, "sft")
    # the task
    parser.add_argument("--task", type=str, default="GSM8K", choices=RL_TASKS,
                        help="what to optimize: GSM8K (hub data), or the offline Arithmetic / SpellingBee tasks")
    parser.add_argument("--train-size", type=int_at_least(1), default=8000,
                        help="Arithmetic/SpellingBee: problems in the train split (GSM8K: its 7,473)")
    # horizon and batch
    parser.add_argument("--num-epochs", type=int_at_least(1), default=1, help="passes over the train split")
    parser.add_argument("--num-iterations", type=int_at_least(-1), default=-1, help="optimizer steps (-1 = from --num-epochs)")
    parser.add_argument("--examples-per-step", type=int_at_least(1), default=16,
                        help="questions per optimizer step, over all ranks (must divide by the world size)")
    parser.add_argument("--num-samples", type=int_at_least(1), default=16, help="completions sampled per question")
    parser.add_argument("--device-batch-size", type=int_at_least(1), default=8,
                        help="rows per sampling call and per forward/backward")
    # sampling
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=256, help="tokens per completion at most")
    parser.add_argument("--temperature", type=float_at_least(0), default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int_at_least(0), default=50, help="top-k sampling (0 = off)")
    # optimization
    add_lr_arguments(parser, embedding=0.2, unembedding=0.004, matrix=0.02)
    parser.add_argument("--init-lr-frac", type=float_above(0), default=0.05, help="initial LR as a fraction of the base LRs")
    # evaluation and saving
    parser.add_argument("--eval-every", type=int_at_least(-1), default=60, help="pass@k every N steps and at the end (-1 = never)")
    parser.add_argument("--eval-examples", type=int_at_least(1), default=400, help="held-out problems for pass@k")
    parser.add_argument("--eval-samples", type=int_at_least(1), default=8, help="samples per held-out problem (pass@1..this)")
    parser.add_argument("--save-every", type=int_at_least(-1), default=60, help="also save every N steps (-1 = only at the end)")
    add_push_arguments(parser)
    return parser


def build_tasks(name, train_size, eval_examples):
    """(train task, held-out eval task). The generated tasks' test split never shares a seed with train."""
    if name == "GSM8K":
        try:
            return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test", stop=eval_examples)
        except TaskDataUnavailable as e:
            raise UserError(f"GSM8K is unavailable ({str(e).splitlines()[0][:300]}). Pass --task Arithmetic "
                             f"(offline), or point NANOCHAT_TASK_DATA_GSM8K at a local copy.") from None
    task_class = {"Arithmetic": Arithmetic, "SpellingBee": SpellingBee}[name]
    return task_class(size=train_size, split="train"), task_class(size=eval_examples, split="test")


# -----------------------------------------------------------------------------
# Settings: resolved once from the flags and the start checkpoint, read-only afterwards

@dataclass(frozen=True)
class Settings:
    start: training.StartPoint
    num_steps: int
    examples_per_rank: int
    user_config: dict

    @property
    def resuming(self):
        return self.start.resuming


def resolve_settings(args, world_size, train_size):
    """Settings from the flags, the start checkpoint's meta and the train split's size."""
    if args.examples_per_step % world_size != 0:
        raise UserError(f"--examples-per-step {args.examples_per_step} must be a multiple of the world "
                         f"size {world_size}")
    start = training.resolve_start(args.source, args.model_tag, args.model_step, "rl", args.output_tag,
                                   args.resume_from_step)
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        (train_size // args.examples_per_step) * args.num_epochs
    if num_steps <= 0:
        raise UserError(f"no steps to run: {train_size} training problems make no batch of "
                         f"--examples-per-step {args.examples_per_step}; pass --num-iterations")
    print0(f"Steps: {num_steps} x {args.examples_per_step} questions x {args.num_samples} samples")
    return Settings(start=start, num_steps=num_steps, examples_per_rank=args.examples_per_step // world_size,
                    user_config={**vars(args), "num_steps": num_steps})


# -----------------------------------------------------------------------------
# The run: setup (__init__) -> loop (run: evaluate, save, one optimization step, log) -> summary (finish)

class RLRun:
    """One RL run; main() shows its shape."""

    def __init__(self, args):
        self.args = args
        self.rt = rt = training.init_runtime(args.device_type)
        self.wandb_run = training.init_wandb(args.run, "nanochat-rl", vars(args).copy(), rt.master)
        if rt.device_type == "cpu":
            warn_if_cpu_is_busy()
        self.train_task, self.eval_task = build_tasks(args.task, args.train_size, args.eval_examples)
        self.s = s = resolve_settings(args, rt.world_size, len(self.train_task))
        self.pusher = CheckpointPusher(args.push_to)
        self.model, self.tokenizer, _ = build_model(s.start.start_dir, s.start.start_step, rt.device, phase="train")
        self.engine = Engine(self.model, self.tokenizer)  # the calculator tool, as in SFT's data
        self.optimizer = self.model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                                    matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
        if s.resuming:
            training.warm_start_optimizer(self.optimizer, s.start.start_dir, s.start.start_step, rt, required=True)
        training.scale_learning_rates(self.optimizer, args.init_lr_frac)
        self.scaler = training.make_grad_scaler()
        training.check_run_can_save(s.start.output_dir, self.model, self.optimizer, rt)
        self.report = get_report()
        loop = s.start.meta["loop_state"] if s.resuming else {}
        self.step = self.start_step = loop.get("step", 0)
        self.pass_at = loop.get("pass_at", {})
        self.first_pass_at = loop.get("first_pass_at", {})
        self.rewards = {}  # step -> mean reward, this process's steps (for callers)
        self.meter = training.resumed_meter(loop, self.model.estimate_flops(), rt)

    def run(self):
        args, s = self.args, self.s
        with ManualGC() as manual_gc:
            while True:
                last_step = self.step >= s.num_steps
                self.evaluate(last_step)
                if training.is_save_step(self.step, self.start_step, args.save_every, last_step):
                    self.save()
                if last_step:
                    break
                stats = self.train_step()
                self.log_step(stats)
                manual_gc.after_step(self.step)

    # -------------------------------------------------------------------------
    # rollouts and one optimization step

    def step_examples(self):
        """This rank's questions of the current step (global positions step*E + j*W + rank, cycling through the
        train split): the same questions whatever the world size."""
        n, world, rank = len(self.train_task), self.rt.world_size, self.rt.rank
        first = self.step * self.args.examples_per_step
        return [(first + j * world + rank) % n for j in range(self.s.examples_per_rank)]

    def sample(self, conversation, index, num_samples, step):
        """num_samples completions of one question in chunks of --device-batch-size ->
        (token rows, masks, completions as text); no rows when the prompt leaves no room to answer."""
        args = self.args
        prompt = self.tokenizer.render_for_completion(conversation)
        if len(prompt) >= self.model.config.sequence_len:
            return [], [], []
        results, masks = [], []
        for chunk, start in enumerate(range(0, num_samples, args.device_batch_size)):
            rows, row_masks = self.engine.generate_batch(
                prompt, num_samples=min(args.device_batch_size, num_samples - start), max_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k or None, seed=sample_seed(step, index, chunk))
            results += rows
            masks += row_masks
        completions = [self.tokenizer.decode(row[len(prompt):]) for row in results]
        return results, masks, completions

    def rollouts(self):
        """This rank's micro-batches [(inputs, targets, advantages)] for the step, and (reward sum, samples) for
        the log."""
        micro_batches, reward_sum, samples = [], 0.0, 0
        pad = self.tokenizer.encode_special("<|assistant_end|>")
        for index in self.step_examples():
            conversation = self.train_task[index]
            results, masks, completions = self.sample(conversation, index, self.args.num_samples, self.step)
            if not results:
                print0(f"WARNING: problem {index}'s prompt fills the context; skipped")
                continue
            rewards = [self.train_task.reward(conversation, c) for c in completions]
            advantages = group_advantages(rewards)
            reward_sum, samples = reward_sum + sum(rewards), samples + len(rewards)
            for start in range(0, len(results), self.args.device_batch_size):
                end = start + self.args.device_batch_size
                inputs, targets = rollout_rows(results[start:end], masks[start:end], pad, self.rt.device)
                micro_batches.append((inputs, targets, advantages[start:end].to(self.rt.device)))
        if not micro_batches:  # every rank must reach the optimizer with gradients (its collectives expect them)
            nothing = torch.full((1, 1), -1, dtype=torch.long, device=self.rt.device)
            micro_batches.append((nothing.clamp(min=pad), nothing, torch.zeros(1, device=self.rt.device)))
        return micro_batches, (reward_sum, samples)

    def train_step(self):
        """Sample, then one policy-gradient step. Returns the step's numbers for the log."""
        s, rt = self.s, self.rt
        rt.synchronize()
        t0 = time.time()
        micro_batches, local_stats = self.rollouts()
        scale, step_tokens = step_loss_scale([(x, y) for x, y, _ in micro_batches], rt.world_size, rt.ddp)
        loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
        for inputs, targets, advantages in micro_batches:
            loss = policy_gradient_loss(self.model, inputs, targets, advantages) * scale
            training.backward(loss, self.scaler)
            loss_sum += loss.detach().float()
        if rt.ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        loss_value = loss_sum.item()
        training.check_finite_loss(loss_value, self.step)
        lrm = progress_lr_multiplier(self.step / s.num_steps, 0.0, 1.0, 0.0)  # linear ramp to zero
        set_schedule(self.optimizer, lrm, MUON_MOMENTUM)
        optimizer_step(self.optimizer, self.scaler, rt.ddp)
        self.model.zero_grad(set_to_none=True)
        self.engine.weights_changed()  # the CPU decoder's weight snapshot is stale now
        rt.synchronize()
        self.step += 1
        reward_sum, samples = training.sum_over_ranks(local_stats, rt)
        train_loss = loss_value / rt.world_size
        self.meter.update(train_loss, time.time() - t0, step_tokens, self.step)
        return {"lrm": lrm, "reward": reward_sum / max(1, samples), "sequence_length": step_tokens / max(1, samples)}

    # -------------------------------------------------------------------------
    # evaluation, logging, saving

    def evaluate(self, last_step):
        args = self.args
        if args.eval_every <= 0 or (self.s.resuming and self.step == self.start_step):
            return  # never asked for, or the resumed run evaluated this step already
        if not (last_step or self.step % args.eval_every == 0):
            return
        t0 = time.time()
        self.pass_at = self.pass_at_k()
        if not self.first_pass_at:
            self.first_pass_at = dict(self.pass_at)
        print0(f"Step {self.step:05d} | {self.args.task} held-out ({time.time() - t0:.0f}s): " +
               ", ".join(f"{k}: {v:.4f}" for k, v in self.pass_at.items()))
        for k, v in self.pass_at.items():
            self.report.log_point(k, self.step, v, section="Chat RL")
        self.wandb_run.log({"step": self.step, **self.pass_at})

    def pass_at_k(self):
        """{"pass@k": estimate} for k = 1..--eval-samples over the held-out problems (rank-strided, summed over
        ranks). The samples are seeded by problem, the same at every evaluation: the curve shows the model move."""
        args, rt = self.args, self.rt
        n = args.eval_samples
        totals = [0.0] * (n + 1)  # pass@1..n sums, then the number of problems
        for index in range(rt.rank, len(self.eval_task), rt.world_size):
            conversation = self.eval_task[index]
            _, _, completions = self.sample(conversation, index, n, EVAL_SEED_STEP)
            correct = sum(self.eval_task.evaluate(conversation, c) for c in completions)
            for k in range(1, n + 1):
                totals[k - 1] += pass_at_k(n, correct, k) if completions else 0.0
            totals[n] += 1
        totals = training.sum_over_ranks(totals, self.rt)
        return {f"pass@{k}": totals[k - 1] / max(1, totals[n]) for k in range(1, n + 1)}

    def log_step(self, stats):
        meter, step, num_steps = self.meter, self.step, self.s.num_steps
        extra = {"reward": f"{stats['reward']:.4f}", "seq len": f"{stats['sequence_length']:.1f}"}
        epoch = step * self.args.examples_per_step // len(self.train_task)
        print0(meter.line(f"{step:05d}/{num_steps:05d}", 100 * step / num_steps, stats["lrm"], epoch,
                          meter.eta(num_steps - step), extra=extra))
        self.rewards[step] = stats["reward"]
        self.report.log_point("reward", step, stats["reward"], section="Chat RL")
        self.wandb_run.log({"step": step, **stats, **meter.wandb_metrics()})

    def save(self):
        s, rt, args = self.s, self.rt, self.args
        number = s.start.step_offset + self.step
        meta = training.checkpoint_meta(
            number, None, asdict(self.model.config), s.user_config, args.device_batch_size,
            self.model.config.sequence_len, None, tokenizer=self.tokenizer, task=args.task, **training.fine_tuning_state(
                s.start, args.source, self.step, s.num_steps, self.meter, pass_at=self.pass_at,
                first_pass_at=self.first_pass_at))
        training.save_run_checkpoint(s.start, self.step, self.model, self.optimizer, meta, rt.rank, self.pusher)

    def finish(self):
        """Summary lines and the report section; returns what callers and tests look at."""
        args, s = self.args, self.s
        summary = training.fine_tuning_summary(s.start, args.source, self.step, self.meter, self.rt.world_size)
        curve = [{f"{k} before": v for k, v in self.first_pass_at.items()},
                 {f"{k} after": v for k, v in self.pass_at.items()}] if self.pass_at else []
        self.report.log(section="Chat RL", data=[
            vars(args),
            {**summary, "Task": args.task, "Training problems": len(self.train_task),
             "Held-out problems": len(self.eval_task)},
            *curve,
        ])
        self.wandb_run.finish()
        return {"step": self.step, "output_dir": s.start.output_dir, "pass_at": self.pass_at,
                "first_pass_at": self.first_pass_at, "rewards": self.rewards}


def main(argv=None):
    args = build_parser().parse_args(argv)
    return training.run_to_the_end(lambda: RLRun(args), args.push_wait)


if __name__ == "__main__":
    exit_on_user_error(main)
