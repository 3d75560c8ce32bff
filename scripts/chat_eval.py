"""
Evaluate a chat model on the ChatCORE tasks.

    python -m scripts.chat_eval -i sft                     # all six tasks, ChatCORE at the end
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC, MMLU) are scored by one batched forward: the logits at the last prompt position,
restricted to the answer letters, argmax. Generative tasks (GSM8K, HumanEval, SpellingBee) sample through the
Engine and pass if any of the -n samples passes (pass@k). ChatCORE = mean centered accuracy over the six tasks.

--think on|off (default: the model's, chat_sft --think-default) prefills the think block of generative answers;
a sample is graded on its answer after </think>, and one whose think never closed within -m tokens has no answer
(a miss). Categorical tasks read the letter from one forward, so with a think mode they get the empty (off) block
before the letter, as the model was trained to answer right after it.
"""

import argparse
import time

import torch
import torch.distributed as dist

from nanochat.chat_format import THINK_OPEN, model_think_default, split_reasoning, think_prefill
from nanochat.common import compute_init, compute_cleanup, get_dist_info, print0

# Random-guess accuracy of each task, for centering (0 = chance, 1 = perfect).
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
ALL_TASKS = list(BASELINES)


def make_task(name):
    """Build a task by its ChatCORE name (test splits as the reference; SpellingBee 256 test words)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")
    if name == "Arithmetic":
        from tasks.arithmetic import Arithmetic
        return Arithmetic(size=256, split="test")
    raise ValueError(f"unknown task {name!r}; choose from {'|'.join(ALL_TASKS + ['Arithmetic'])}")


def _all_reduce_counts(passed, total, device):
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([passed, total], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        passed, total = t.tolist()
    return passed, total


@torch.inference_mode()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, prompt_suffix=()):
    """Accuracy of picking the gold letter from the last-position logits restricted to the choices (after
    prompt_suffix, e.g. an empty think block, is appended to every prompt)."""
    _, rank, _, world = get_dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    seq_len = model.config.sequence_len
    n = len(task) if max_problems is None else min(len(task), max_problems)
    indices = list(range(rank, n, world))
    passed = 0
    letter_ids = {}
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) + list(prompt_suffix) for c in conversations]
        prompts = [p if len(p) <= seq_len else p[:1] + p[-(seq_len - 1):] for p in prompts]  # keep BOS, keep the end
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), bos, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(ids.to(device))
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    encoded = tokenizer.encode(letter)
                    if len(encoded) != 1:
                        raise ValueError(f"answer letter {letter!r} is not a single token in this tokenizer")
                    letter_ids[letter] = encoded[0]
            choice_logits = logits[row, len(prompt) - 1, [letter_ids[l] for l in letters]]
            predicted = letters[int(choice_logits.argmax())]
            passed += int(bool(task.evaluate(conversation, predicted)))
    passed, total = _all_reduce_counts(passed, len(indices), device)
    return passed / max(total, 1)


def answer_of(completion):
    """A completion without its think block ("" when the think never closed: no answer); others unchanged."""
    if not completion.lstrip().startswith(THINK_OPEN):
        return completion
    return split_reasoning(completion)[1] or ""


@torch.inference_mode()
def run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, verbose=True, think=None):
    """pass@num_samples: a problem passes if any sampled completion passes the task's checker."""
    _, rank, _, world = get_dist_info()
    device = model.get_device()
    seq_len = model.config.sequence_len
    n = len(task) if max_problems is None else min(len(task), max_problems)
    passed = total = 0
    for i in range(rank, n, world):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        prefill = len(engine.think_prefill_tokens(think))
        if len(prompt) + prefill >= seq_len:  # cannot answer at all: counts as a miss, never a crash
            total += 1
            continue
        budget = min(max_new_tokens, seq_len - len(prompt) - prefill)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                           temperature=temperature, top_k=top_k, think=think)
        completions = [answer_of(tokenizer.decode(r[len(prompt):])) for r in results]
        passed += int(any(task.evaluate(conversation, c) for c in completions))
        total += 1
        if verbose and rank == 0:
            print(f"\r\033[K{type(task).__name__} rank0 {passed}/{total} ({passed / total:.1%})", end="", flush=True)
    if verbose and rank == 0:
        print()
    passed, total = _all_reduce_counts(passed, total, device)
    return passed / max(total, 1)


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, task=None, think=None):
    """Accuracy of one task; `task` overrides building it by name (for custom or local data). think: "on"/"off"
    (None: the engine's think_default)."""
    task = task if task is not None else make_task(task_name)
    if task.eval_type == "categorical":
        suffix = tokenizer.encode(think_prefill("off")) if engine.think_mode(think) else []
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems, prompt_suffix=suffix)
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature,
                                   top_k, max_problems, think=think)
    raise ValueError(f"task {task_name} has unknown eval_type {task.eval_type!r}")


def centered(accuracy, baseline):
    return (accuracy - baseline) / (1.0 - baseline)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC/MMLU/GSM8K/HumanEval/SpellingBee.")
    parser.add_argument("-i", "--source", required=True, help="checkpoint kind: base|sft|rl|dpo")
    parser.add_argument("-a", "--task-name", default=None,
                        help=f"'|'-separated tasks (default all: {'|'.join(ALL_TASKS)}; also Arithmetic)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (generative)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="tokens per generative answer")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k for sampling")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical tasks")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="cap problems per task")
    parser.add_argument("--think", default=None, choices=["on", "off"],
                        help="think mode of generative answers (default: the model's); graded after </think>")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    _, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, think_default=model_think_default(meta))
    if engine.think_mode(args.think) == "on":
        print0("NOTE: categorical tasks (ARC, MMLU) are read from one forward: they get an empty think block")

    task_names = args.task_name.split("|") if args.task_name else ALL_TASKS
    results = {}
    for name in task_names:
        t0 = time.time()
        acc = run_chat_eval(name, model, tokenizer, engine, batch_size=args.batch_size,
                            num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems,
                            think=args.think)
        results[name] = acc
        print0(f"{name}: {acc:.2%} ({time.time() - t0:.1f}s)")

    report_data = [vars(args), results]
    if all(name in results for name in ALL_TASKS):
        chatcore = sum(centered(results[n], BASELINES[n]) for n in ALL_TASKS) / len(ALL_TASKS)
        report_data.append({"ChatCORE metric": chatcore})
        print0(f"ChatCORE metric: {chatcore:.4f}")
    if rank == 0:
        try:
            from nanochat.report import get_report
            get_report().log(section=f"Chat evaluation {args.source}", data=report_data)
        except ImportError:
            pass
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
