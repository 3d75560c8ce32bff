"""
Chat-model evaluation on the ChatCORE tasks (what scripts/chat_eval runs, and chat_sft during training).

Categorical tasks (ARC, MMLU) are scored by one batched forward: the logits at the last prompt position,
restricted to the answer letters, argmax. Generative tasks (GSM8K, HumanEval, SpellingBee, Arithmetic) sample
through the Engine and pass if any of the samples passes (pass@k). ChatCORE = mean centered accuracy over the
six ChatCORE tasks (centered as CORE's: 0 = chance, 1 = perfect).
"""

import torch
import torch.distributed as dist

from nanochat.chat_format import THINK_OPEN, split_reasoning, think_prefill
from nanochat.common import get_dist_info
from nanochat.core_eval import centered_accuracy
from nanochat.engine import Engine
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# Random-guess accuracy of each ChatCORE task in percent, as centered_accuracy takes it.
BASELINES = {"ARC-Easy": 25.0, "ARC-Challenge": 25.0, "MMLU": 25.0, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
ALL_TASKS = list(BASELINES)


def make_task(name):
    """Build a task by its ChatCORE name (test splits as the reference; SpellingBee 256 test words), or
    Arithmetic (the offline mixture's own check)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=name, split="test")
    if name == "MMLU":
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        return GSM8K(subset="main", split="test")
    if name == "HumanEval":
        return HumanEval()
    if name == "SpellingBee":
        return SpellingBee(size=256, split="test")
    if name == "Arithmetic":
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


def chatcore(results):
    """Mean centered accuracy over the six ChatCORE tasks; None unless every one of them is in `results`."""
    if not all(name in results for name in ALL_TASKS):
        return None
    return sum(centered_accuracy(results[n], BASELINES[n]) for n in ALL_TASKS) / len(ALL_TASKS)


def evaluate_chat_tasks(model, tokenizer, task_names, batch_size, max_categorical=-1, max_generative=-1, tasks=None):
    """{task: accuracy} with greedy answers (at most max_* problems per task, -1 = all), plus "ChatCORE" when
    all six of its tasks ran: the evaluation a trainer runs as it goes. tasks: a dict the caller keeps between
    calls, so each dataset is read once per run (filled here as tasks are first needed)."""
    engine = Engine(model, tokenizer)
    tasks = {} if tasks is None else tasks
    results = {}
    for name in task_names:
        if name not in tasks:
            tasks[name] = make_task(name)
        task = tasks[name]
        limit = max_categorical if task.eval_type == "categorical" else max_generative
        results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=batch_size,
                                      max_new_tokens=min(512, model.config.sequence_len),
                                      max_problems=None if limit < 0 else limit, task=task)
    metric = chatcore(results)
    if metric is not None:
        results["ChatCORE"] = metric
    return results
