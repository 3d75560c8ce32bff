"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794): 22 in-context-learning tasks scored
by a base model's log-likelihoods, each accuracy centered on its random baseline, then averaged.

Scoring follows nanochat's core_eval exactly (same prompts, same few-shot draws, same token bookkeeping),
so numbers are comparable with nanochat's and with the GPT-2 reference CSVs in the eval bundle:
- multiple_choice: one prompt per choice (shared context); the scored tokens start where the choices'
  token sequences first differ; the choice with the lowest mean cross-entropy wins.
- schema: one prompt per context option, shared continuation; the scored tokens are the common token
  suffix; lowest mean cross-entropy wins.
- language_modeling: correct iff greedy argmax reproduces every continuation token.
Few-shot examples: random.Random(1234 + idx).sample over the other items. Every prompt starts with BOS,
the prompts of one example are right-padded with BOS into one batch.

Computing it (score_example) does less work than the reference's single full-logits forward per example
(score_example_plain, kept as the yardstick): logits only where something is scored, and the token prefix
the options share (few-shot examples + question) run once through a KV cache instead of once per option.
Both give the same per-option losses up to float rounding, hence the same decisions.

Data: the eval bundle ($NANOCHAT_BASE_DIR/eval_bundle/, downloaded once from EVAL_BUNDLE_URL, or
NANOCHAT_EVAL_BUNDLE_URL) with core.yaml, eval_meta_data.csv (random baselines) and eval_data/*.jsonl.
"""

import os
import csv
import inspect
import random
import shutil
import zipfile
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
import yaml
from jinja2 import Template
from filelock import FileLock
from tqdm import tqdm

from nanochat.common import get_base_dir, print0
from nanochat.download import download_file
from nanochat.fileio import iter_jsonl
from nanochat.gpt import GPT
from nanochat.kv_cache import KVCache

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt rendering. The templates are nanochat's, character for character: a few-shot example is
# "<context><delimiter><answer>\n\n", then the item itself.

MC_TEMPLATE = Template("""
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip())

SCHEMA_TEMPLATE = Template("""
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip())

# LM contexts are trimmed: some datasets carry trailing whitespace, which would merge into the next token
LM_TEMPLATE = Template("""
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip())


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One full prompt per choice."""
    ctx = {"fewshot_examples": fewshot_examples or [], "continuation_delimiter": continuation_delimiter, "item": item}
    return [MC_TEMPLATE.render(choice=choice, **ctx) for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One full prompt per context option (the continuation is shared)."""
    ctx = {"fewshot_examples": fewshot_examples or [], "continuation_delimiter": continuation_delimiter, "item": item}
    return [SCHEMA_TEMPLATE.render(context=option, **ctx) for option in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """[prompt without the continuation (stripped), prompt with it]."""
    ctx = {"fewshot_examples": fewshot_examples or [], "continuation_delimiter": continuation_delimiter, "item": item}
    prompt_without = LM_TEMPLATE.render(include_continuation=False, **ctx)
    prompt_with = LM_TEMPLATE.render(include_continuation=True, **ctx)
    # strip: a trailing space in prompt_without would be absorbed into the continuation's first token in
    # prompt_with, and prompt_without would no longer be a clean token prefix of prompt_with
    return [prompt_without.strip(), prompt_with]


def render_prompts(item, task_type, continuation_delimiter, fewshot_examples=None):
    if task_type == "multiple_choice":
        return render_prompts_mc(item, continuation_delimiter, fewshot_examples)
    if task_type == "schema":
        return render_prompts_schema(item, continuation_delimiter, fewshot_examples)
    if task_type == "language_modeling":
        return render_prompts_lm(item, continuation_delimiter, fewshot_examples)
    raise ValueError(f"unsupported CORE task type {task_type!r}, expected one of {TASK_TYPES}")


class _IndicesExcept(Sequence):
    """range(n) without `skip`, without building the list: random.sample draws depend only on len() and
    indexing, so sampling from this gives exactly what sampling from the list would (O(k) instead of O(n))."""

    def __init__(self, n, skip):
        self.n, self.skip = n, skip

    def __len__(self):
        return self.n - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if i < self.skip else i + 1


def sample_fewshot(data, idx, num_fewshot):
    """The few-shot examples for item idx: Random(1234 + idx) draws num_fewshot of the *other* items."""
    if num_fewshot <= 0:
        return []
    if num_fewshot > len(data) - 1:
        raise ValueError(f"{num_fewshot}-shot needs at least {num_fewshot + 1} items, this task has {len(data)} "
                         f"(raise --max-per-task above {num_fewshot})")
    rng = random.Random(1234 + idx)
    return [data[i] for i in rng.sample(_IndicesExcept(len(data), idx), num_fewshot)]


# -----------------------------------------------------------------------------
# Tokens: where each scored span starts and ends

def find_common_length(token_sequences, direction="left"):
    """Length of the common prefix ('left') or suffix ('right') of the sequences."""
    min_len = min(len(seq) for seq in token_sequences)
    positions = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, pos in enumerate(positions):
        token = token_sequences[0][pos]
        if not all(seq[pos] == token for seq in token_sequences):
            return i
    return min_len


def stack_sequences(tokens, pad_token_id):
    """(B, T_max) LongTensor, right-padded with pad_token_id."""
    input_ids = torch.full((len(tokens), max(len(t) for t in tokens)), pad_token_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        input_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return input_ids


def _encode(tokenizer, prompts):
    return tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())


def batch_sequences_mc(tokenizer, prompts):
    """Same context, different continuations: the scored span starts after the common token prefix."""
    tokens = _encode(tokenizer, prompts)
    answer_start = find_common_length(tokens, direction="left")
    return tokens, [answer_start] * len(prompts), [len(t) for t in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Different contexts, same continuation: the scored span is the common token suffix."""
    tokens = _encode(tokenizer, prompts)
    suffix_length = find_common_length(tokens, direction="right")
    ends = [len(t) for t in tokens]
    return tokens, [e - suffix_length for e in ends], ends


def batch_sequences_lm(tokenizer, prompts):
    """Only the prompt with the continuation is forwarded; the span is what prompt_without lacks."""
    tokens_without, tokens_with = _encode(tokenizer, prompts)
    start, end = len(tokens_without), len(tokens_with)
    if not (start < end and tokens_with[:start] == tokens_without):
        raise ValueError("CORE language_modeling: the prompt without the continuation does not tokenize to a "
                         "prefix of the prompt with it; this tokenizer cannot score this item")
    return [tokens_with], [start], [end]


def batch_sequences(tokenizer, prompts, task_type):
    if task_type == "multiple_choice":
        return batch_sequences_mc(tokenizer, prompts)
    if task_type == "schema":
        return batch_sequences_schema(tokenizer, prompts)
    if task_type == "language_modeling":
        return batch_sequences_lm(tokenizer, prompts)
    raise ValueError(f"unsupported CORE task type {task_type!r}, expected one of {TASK_TYPES}")


def model_max_seq_len(model):
    """
    Longest sequence to feed the model, or None for no limit.
    Like nanochat: only models that declare `max_seq_len` (e.g. a GPT-2 wrapper: 1024) get prompts cut there.
    A nanochat GPT has none and is fed full prompts (its rotary table covers 10x its training length);
    only past that table (`rotary_seq_len`), where nanochat itself would crash, do we cut too.
    """
    max_len = getattr(model, "max_seq_len", None)
    if max_len is None:
        max_len = getattr(model, "rotary_seq_len", None)
    return max_len


def truncate_sequences(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each sequence (left truncation) and shift its span accordingly."""
    new_tokens, new_starts, new_ends = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        crop = max(len(t) - max_len, 0)
        if s - crop < 1:
            # not even the scored span plus one token of context fits: there is nothing sound to score
            raise ValueError(f"CORE prompt cannot fit: the scored continuation is {e - s} tokens and needs at least "
                             f"one token of context, but the model takes at most {max_len} tokens "
                             f"(prompt is {len(t)} tokens). Use a model with a longer context or skip this task.")
        new_tokens.append(t[crop:])
        new_starts.append(s - crop)
        new_ends.append(e - crop)
    return new_tokens, new_starts, new_ends


@torch.no_grad()
def forward_model(model, input_ids):
    """(B, T) ids → per-position cross-entropy against the next token (last column NaN) and argmax predictions.
    The reference's computation: logits at every position. Used by the plain path (score_example_plain)."""
    batch_size, seq_len = input_ids.size()
    logits = model(input_ids).float()
    target_ids = torch.roll(input_ids, shifts=-1, dims=1)
    losses = torch.nn.functional.cross_entropy(
        logits.view(batch_size * seq_len, -1), target_ids.view(batch_size * seq_len), reduction="none"
    ).view(batch_size, seq_len)
    losses[:, -1] = float("nan")  # no next token there
    return losses, logits.argmax(dim=-1)


# -----------------------------------------------------------------------------
# Scoring

def prepare_example(idx, tokenizer, data, task_meta, max_seq_len=None):
    """Render, tokenize and (if needed) truncate item idx → (tokens, starts, ends)."""
    task_type = task_meta["task_type"]
    fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
    prompts = render_prompts(data[idx], task_type, task_meta["continuation_delimiter"], fewshot)
    tokens, starts, ends = batch_sequences(tokenizer, prompts, task_type)
    if max_seq_len is not None:
        tokens, starts, ends = truncate_sequences(tokens, starts, ends, max_seq_len)
    return tokens, starts, ends


def decide(task_type, input_ids, losses, predictions, starts, ends, gold, first=0):
    """
    The reference's decision from per-position losses / argmax predictions whose column 0 is position `first`
    of input_ids (0 for full logits). multiple_choice / schema: the option with the lowest mean cross-entropy
    over its span (Python min/index over the list, so ties and NaNs resolve exactly like the reference);
    language_modeling: every continuation token is the greedy prediction. → (is_correct, mean losses or None).
    """
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        # predictions at position t guess input_ids[t + 1]
        is_correct = bool(torch.all(predictions[0, s - 1 - first:e - 1 - first] == input_ids[0, s:e]).item())
        return is_correct, None
    mean_losses = torch.stack([losses[i, s - 1 - first:e - 1 - first].mean()
                               for i, (s, e) in enumerate(zip(starts, ends))]).tolist()
    pred = mean_losses.index(min(mean_losses))
    return pred == gold, mean_losses


@torch.no_grad()
def score_example_plain(idx, model, tokenizer, data, device, task_meta):
    """The reference's way, kept as the yardstick for the fast path: one forward over the whole batch with
    logits at every position. → (is_correct, mean losses per option; None for language_modeling)."""
    task_type = task_meta["task_type"]
    tokens, starts, ends = prepare_example(idx, tokenizer, data, task_meta, model_max_seq_len(model))
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)  # BOS as padding is fine
    losses, predictions = forward_model(model, input_ids)
    return decide(task_type, input_ids, losses, predictions, starts, ends, data[idx].get("gold"))


def _accepts_logits_from(model):
    """Does the model's forward take logits_from (nanochat's GPT does; a plain callable may not)?"""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "logits_from" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _logits_from(model, input_ids, first, **kwargs):
    """Logits for positions first.. of input_ids, (B, T - first, V) in fp32, computing no more than needed."""
    if first > 0 and _accepts_logits_from(model):
        return model(input_ids, logits_from=first, **kwargs).float()
    return model(input_ids, **kwargs)[:, first:].float()  # a model that only returns every position's logits


# Sharing the prefix costs a second forward call and a KV-cache copy: below this many tokens saved (options - 1)
# x prefix it is slower than forwarding the prefix in every row (d6 on CPU: 0-shot winogrande 0.8x, 10-shot ARC 5x)
MIN_SHARED_TOKENS = 64


def _can_share_prefix(model):
    return isinstance(model, GPT)


def _shared_prefix_logits(model, input_ids, prefix_len, first):
    """
    Logits for positions first.. of every row of input_ids, whose first prefix_len tokens are the same in all
    rows (prefix_len <= first): the prefix goes through the model once (batch 1) into a KV cache, the cache is
    fanned out to the B rows, and only the rest of each row is forwarded. Causal attention makes this exact:
    a prefix position never sees what follows it, so its keys/values are the same in every row.
    """
    batch_size, seq_len = input_ids.shape

    def cache(rows, length):
        return KVCache.for_model(model, rows, length, device=input_ids.device)

    prefix_cache = cache(1, prefix_len)
    model(input_ids[:1, :prefix_len], kv_cache=prefix_cache, last_logits_only=True)  # logits unused
    rows_cache = cache(batch_size, seq_len)
    rows_cache.prefill(prefix_cache)
    del prefix_cache
    return _logits_from(model, input_ids[:, prefix_len:], first - prefix_len, kv_cache=rows_cache)


@torch.no_grad()
def score_example(idx, model, tokenizer, data, device, task_meta):
    """
    (is_correct, mean losses per option; None for language_modeling) for item idx: the same prompts, tokens,
    truncation and decision as score_example_plain, computed with less work:
    - logits and cross-entropy only from the first scored position on (the context is never scored);
    - options that share a token prefix (the few-shot examples and the question, for multiple choice and for
      schema's examples) run that prefix through the model once, not once per option.
    """
    task_type = task_meta["task_type"]
    tokens, starts, ends = prepare_example(idx, tokenizer, data, task_meta, model_max_seq_len(model))
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)  # BOS as padding is fine
    first = min(starts) - 1  # the first position whose next-token prediction is scored
    # on the final (possibly truncated) tokens: rows cropped differently simply share less
    prefix_len = min(find_common_length(tokens, direction="left"), first) if len(tokens) > 1 else 0
    if prefix_len > 0 and (len(tokens) - 1) * prefix_len >= MIN_SHARED_TOKENS and _can_share_prefix(model):
        logits = _shared_prefix_logits(model, input_ids, prefix_len, first)
    else:
        logits = _logits_from(model, input_ids, first)
    batch_size, num_positions = logits.shape[:2]
    targets = input_ids[:, first + 1:]  # position first + j predicts token first + j + 1
    losses = predictions = None
    if task_type == "language_modeling":
        predictions = logits.argmax(dim=-1)
    else:
        # every position but the last has a target; the last column stays NaN like the reference's
        losses = torch.full((batch_size, num_positions), float("nan"), device=logits.device)
        losses[:, :-1] = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        ).view(batch_size, num_positions - 1)
    return decide(task_type, input_ids, losses, predictions, starts, ends, data[idx].get("gold"), first)


def evaluate_example(idx, model, tokenizer, data, device, task_meta, plain=False):
    """True if the model gets item idx right. plain=True scores it the reference's way (full logits)."""
    score = score_example_plain if plain else score_example
    return score(idx, model, tokenizer, data, device, task_meta)[0]


def evaluate_task(model, tokenizer, data, device, task_meta, plain=False):
    """
    Accuracy on one task. Under torchrun every rank takes items rank, rank+world, ... and the per-item
    results are summed across ranks, so every rank returns the same number. plain: see evaluate_example.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    indices = range(rank, len(data), world_size)
    label = task_meta.get("label", task_meta["task_type"])
    for idx in tqdm(indices, desc=label, disable=rank != 0, leave=False, dynamic_ncols=True):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta, plain=plain))
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


# -----------------------------------------------------------------------------
# The eval bundle and the CORE driver

def ensure_eval_bundle():
    """$NANOCHAT_BASE_DIR/eval_bundle, downloading and unzipping eval_bundle.zip once (under a file lock)."""
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    with FileLock(os.path.join(base_dir, "eval_bundle.lock")):
        if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
            return bundle_dir  # another rank/process got it while we waited
        if os.path.exists(bundle_dir):
            raise RuntimeError(f"{bundle_dir} exists but has no core.yaml; remove it to re-download the eval bundle")
        url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL)
        zip_path = os.path.join(base_dir, "eval_bundle.zip")
        try:
            download_file(url, zip_path, desc="eval_bundle.zip")
        except Exception as e:
            raise RuntimeError(
                f"could not download the CORE eval bundle from {url} ({e}). Copy or symlink an unpacked bundle "
                f"(core.yaml, eval_meta_data.csv, eval_data/) to {bundle_dir}, or set NANOCHAT_EVAL_BUNDLE_URL "
                f"to a reachable copy of eval_bundle.zip.") from e
        with tempfile.TemporaryDirectory(dir=base_dir) as tmpdir:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmpdir)
            found = [root for root, _, files in os.walk(tmpdir) if "core.yaml" in files]
            if not found:
                raise RuntimeError(f"{zip_path} has no core.yaml; it is not a CORE eval bundle (delete it and retry)")
            shutil.move(min(found, key=len), bundle_dir)
        print0(f"Placed the eval bundle at {bundle_dir}")
    return bundle_dir


def load_core_config(bundle_dir):
    """(list of task dicts from core.yaml, {label: random baseline in percent})."""
    with open(os.path.join(bundle_dir, "core.yaml"), "r", encoding="utf-8") as f:
        tasks = yaml.safe_load(f)["icl_tasks"]
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "r", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    return tasks, baselines


def core_task_meta(task):
    """core.yaml entry → the task_meta dict evaluate_task takes."""
    num_fewshot = task["num_fewshot"]
    return {
        "label": task["label"],
        "task_type": task["icl_task_type"],
        "dataset_uri": task["dataset_uri"],
        "num_fewshot": num_fewshot[0] if isinstance(num_fewshot, list) else num_fewshot,
        "continuation_delimiter": task.get("continuation_delimiter", " "),
    }


def load_core_task_data(bundle_dir, task_meta, max_per_task=-1):
    """A task's items, shuffled with Random(1337) (so max_per_task takes a fixed random subset), then capped."""
    path = os.path.join(bundle_dir, "eval_data", task_meta["dataset_uri"])
    data = []
    for line_number, item, problem in iter_jsonl(path):
        if problem is not None:
            raise ValueError(f"{path}:{line_number}: {problem} (a damaged eval bundle: delete it to re-download)")
        data.append(item)
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return data


def centered_accuracy(accuracy, random_baseline):
    """0 = chance, 1 = perfect; random_baseline is in percent, as in eval_meta_data.csv."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None, tasks=None, plain=False):
    """
    The CORE metric. Returns {"results": {label: accuracy}, "centered_results": {label: centered},
    "core_metric": mean of the centered accuracies}. `tasks`: optional list of labels to run (a subset).
    plain=True scores every item the reference's way (full logits, no prefix sharing): same decisions up to
    float rounding, several times slower; kept to check and time the fast path against.
    Writes nothing; scripts.base_eval writes the CSV.
    """
    bundle_dir = bundle_dir or ensure_eval_bundle()
    task_configs, baselines = load_core_config(bundle_dir)
    if tasks is not None:
        known = [t["label"] for t in task_configs]
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise ValueError(f"unknown CORE task(s) {unknown}; core.yaml has {known}")
        task_configs = [t for t in task_configs if t["label"] in set(tasks)]
    results, centered_results = {}, {}
    for task in task_configs:
        task_meta = core_task_meta(task)
        label = task_meta["label"]
        data = load_core_task_data(bundle_dir, task_meta, max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, device, task_meta, plain=plain)
        results[label] = accuracy
        centered_results[label] = centered_accuracy(accuracy, baselines[label])
        print0(f"{label:<35} ({task_meta['num_fewshot']}-shot, {task_meta['task_type']}, {len(data)} items): "
               f"accuracy {accuracy:.4f} | centered {centered_results[label]:.4f}")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}
