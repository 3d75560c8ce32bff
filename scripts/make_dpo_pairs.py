"""
Make DPO preference pairs without a teacher model: for each prompt of a file of reference answers, the reference
answer is `chosen` and the current model's own sampled answer is `rejected` (the forks' recipe: the model learns to
prefer the curated answer over what it says now).

    python -m scripts.make_dpo_pairs --input answers.jsonl --output pairs.jsonl            # the latest SFT model
    python -m scripts.make_dpo_pairs -i base --input kept.jsonl --limit 48 --output train_pairs.jsonl
    python -m scripts.make_dpo_pairs -i base --input kept.jsonl --offset 48 --limit 16 --output val_pairs.jsonl
    python -m scripts.chat_dpo --train-jsonl train_pairs.jsonl --val-jsonl val_pairs.jsonl

Input rows (JSONL): a conversation whose last message is the assistant's reference answer (a list of messages or
{"messages": [...]}, as SFT data), or {"prompt": ..., "chosen": ...} in TRL's standard or conversational form.
A bad row stops the run with file:line before any sampling. The answers are sampled through the Engine (tools on,
--num-samples per prompt in one batch). A pair is dropped when the sample equals the reference answer, when the
reference answer fails the SFT-pool filter (nanochat/sft_filter.py: the same rules and --disable/--extra-rules as
scripts.filter_sft), or when the prompt leaves no room to answer. Output: conversational pairs, written atomically;
a table of what was kept and dropped, and its numbers as one JSON object on the last stdout line.
"""

import argparse
import json
import sys

from tqdm import tqdm

from nanochat.chat_format import assistant_content, assistant_parts_from_tokens
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init
from nanochat.dpo import normalize_pair, prompt_and_answer
from nanochat.engine import Engine
from nanochat.fileio import atomic_open, load_jsonl
from nanochat.report import get_report
from nanochat.sft_filter import RULE_NAMES, build_rules, first_matching_rule, load_extra_rules

MAX_ERRORS_SHOWN = 20


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m scripts.make_dpo_pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], required=True, metavar="PATH",
                        help="reference answers, JSONL (repeatable, read in order)")
    parser.add_argument("--output", required=True, help="the pairs, JSONL (conversational form)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many input rows (e.g. to cut a val set)")
    parser.add_argument("--limit", type=int, default=-1, help="use at most this many input rows (-1 = all)")
    # the model that answers
    parser.add_argument("-i", "--source", default="sft", help="checkpoint kind: base|mid|sft|rl|dpo (default sft)")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--num-samples", type=int, default=1, help="sampled answers per prompt (each one a pair)")
    parser.add_argument("-t", "--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=256, help="tokens per sampled answer at most")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (prompt i uses seed + i)")
    # the filter on the reference answers
    parser.add_argument("--disable", action="append", default=[], metavar="RULE",
                        help=f"switch a filter rule off (repeatable); built-in rules: {', '.join(RULE_NAMES)}")
    parser.add_argument("--extra-rules", default=None, metavar="FILE",
                        help="more filter rules, one `name<TAB>pattern` per line (as scripts.filter_sft)")
    return parser


def read_references(paths, offset, limit):
    """[(prompt messages, [chosen assistant message])] of the rows offset .. offset + limit, or ValueError listing
    every bad row (of the whole files) as path:line."""
    rows, errors = [], []
    for path in paths:
        file_rows, file_errors = load_jsonl(path, prompt_and_answer)
        rows += file_rows
        errors += file_errors
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ValueError(f"{len(errors)} bad row(s); fix them:\n" + "\n".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return rows[offset:] if limit < 0 else rows[offset:offset + limit]


def sample_answers(engine, tokenizer, prompt, args, seed):
    """The model's answers to a prompt as assistant messages (tool calls as parts), or None when the prompt
    leaves no room to answer."""
    ids = tokenizer.render_for_completion(prompt)
    if len(ids) >= engine.model.config.sequence_len:
        return None
    results, _ = engine.generate_batch(ids, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k or None, seed=seed)
    return [{"role": "assistant", "content": assistant_content(assistant_parts_from_tokens(tokenizer, r[len(ids):]))}
            for r in results]


def make_pairs(references, engine, tokenizer, rules, args):
    """(pairs, counts): one pair per sampled answer that differs from the reference answer; counts of what was
    kept and why the rest was dropped."""
    counts = {"prompts": len(references), "pairs": 0, "dropped_long_prompt": 0, "dropped_same_answer": 0,
              "dropped_invalid_sample": 0, **{f"dropped_{name}": 0 for name, _ in rules}}
    pairs = []
    for index, (prompt, chosen) in enumerate(tqdm(references, desc="sampling", unit="prompt", file=sys.stderr)):
        reason = first_matching_rule(chosen, rules)
        if reason is not None:
            counts[f"dropped_{reason}"] += args.num_samples
            continue
        answers = sample_answers(engine, tokenizer, prompt, args, args.seed + index)
        if answers is None:
            counts["dropped_long_prompt"] += args.num_samples
            continue
        chosen_ids = tokenizer.render_conversation(prompt + chosen, max_tokens=None)[0]
        for answer in answers:
            if tokenizer.render_conversation(prompt + [answer], max_tokens=None)[0] == chosen_ids:
                counts["dropped_same_answer"] += 1
                continue
            try:  # what chat_dpo will read back must load (e.g. an answer cut inside a tool block)
                pair = normalize_pair({"prompt": prompt, "chosen": chosen, "rejected": [answer]})
            except ValueError:
                counts["dropped_invalid_sample"] += 1
                continue
            pairs.append(pair)
    counts["pairs"] = len(pairs)
    return pairs, counts


def print_table(counts):
    samples = counts["prompts"] * max(1, counts.get("num_samples", 1))
    print(f"{'':<28} {'count':>8} {'% of samples':>13}")
    for name, n in counts.items():
        if name.startswith("dropped_") or name == "pairs":
            print(f"{name:<28} {n:>8,} {(100.0 * n / samples if samples else 0.0):>13.2f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.offset < 0 or args.num_samples < 1:
            raise ValueError("--offset must be >= 0 and --num-samples >= 1")
        rules = build_rules(disable=args.disable,
                            extra_rules=load_extra_rules(args.extra_rules) if args.extra_rules else [])
        references = read_references(args.input, args.offset, args.limit)
        if not references:
            raise ValueError(f"no input rows left after --offset {args.offset} (--limit {args.limit})")
    except (OSError, ValueError) as e:
        print(f"make_dpo_pairs: error: {e}", file=sys.stderr)
        return 2
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    pairs, counts = make_pairs(references, engine, tokenizer, rules, args)
    with atomic_open(args.output, "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    counts = {**counts, "num_samples": args.num_samples}
    print_table(counts)
    get_report().log(section="DPO pairs", data=[vars(args), counts])
    print(f"Wrote {len(pairs):,} pairs to {args.output}")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
