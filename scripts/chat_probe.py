"""
Run the probe suite against a checkpoint and gate on the pass rate.

    python -m scripts.chat_probe -i sft                       # default probes shipped in tasks/data/probes.jsonl
    python -m scripts.chat_probe -i sft --probes my.jsonl --min-pass 0.9

Prints a pass table per category, appends one result line (model, step, per-category and total pass rate,
time) to a JSONL log, and exits with status 1 when the total pass rate is below --min-pass.
"""

import argparse
import json
import os
import sys
import time

from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, get_base_dir
from nanochat.engine import Engine
from tasks.probes import check_probe, load_probes, split_assistant_tokens, summarize

DEFAULT_PROBES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "data", "probes.jsonl")


def generate_answer(engine, tokenizer, messages, max_new_tokens, seq_len, tool_name):
    """Greedy answer to the last user message; returns the assistant turn's token ids."""
    conversation = {"messages": list(messages) + [{"role": "assistant", "content": ""}]}
    prompt = tokenizer.render_for_completion(conversation)
    if len(prompt) >= seq_len:
        prompt = prompt[:1] + prompt[-(seq_len - 1 - max_new_tokens):] if seq_len - 1 - max_new_tokens > 0 else prompt[-(seq_len // 2):]
    max_new_tokens = max(1, min(max_new_tokens, seq_len - len(prompt)))
    generated = []
    for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_new_tokens, temperature=0.0):
        generated.append(token_column[0])
    return generated


def run_probes(engine, tokenizer, probes, max_new_tokens=256, seq_len=2048, tool_name="calculator", verbose=False):
    """Run every probe; returns a list of (probe, failures, output)."""
    results = []
    for probe in probes:
        tokens = generate_answer(engine, tokenizer, probe["messages"], max_new_tokens, seq_len, tool_name)
        output = split_assistant_tokens(tokens, tokenizer, tool_name=tool_name)
        failures = check_probe(probe, output)
        results.append((probe, failures, output))
        if verbose:
            status = "PASS" if not failures else "FAIL " + "; ".join(r for _, r in failures)
            print(f"[{probe['id']}] {status}\n    {output.raw_text[:200]!r}")
    return results


def print_table(per_category, total):
    width = max([len(c) for c in per_category] + [8])
    print(f"{'category':<{width}}  passed  total   rate")
    for category, (passed, n) in sorted(per_category.items()):
        print(f"{category:<{width}}  {passed:>6}  {n:>5}  {passed / n:6.1%}")
    print(f"{'TOTAL':<{width}}  {sum(p for p, _ in per_category.values()):>6}  "
          f"{sum(n for _, n in per_category.values()):>5}  {total:6.1%}")


def load_engine(args):
    """(model, tokenizer, meta, engine) for the checkpoint named by the CLI flags."""
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer) if args.tool == "calculator" else Engine(model, tokenizer, tools=args.tool)
    return model, tokenizer, meta, engine


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the probe suite against a checkpoint; exit 1 below --min-pass.")
    parser.add_argument("-i", "--source", default="sft", help="checkpoint kind: base|sft|rl|dpo (default sft)")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("--probes", default=DEFAULT_PROBES, help="probe JSONL (default: tasks/data/probes.jsonl)")
    parser.add_argument("--min-pass", type=float, default=0.95, help="gate: minimum total pass rate (default 0.95)")
    parser.add_argument("--log", default=None, help="JSONL to append the result line to "
                                                    "(default $NANOCHAT_BASE_DIR/probe_results.jsonl)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=256, help="tokens to generate per probe")
    parser.add_argument("--tool", default="calculator", choices=["calculator", "python"],
                        help="which tool runs <|python_start|> blocks")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every probe's output")
    args = parser.parse_args(argv)

    probes = load_probes(args.probes)  # fail on a bad probe file before loading a model

    model, tokenizer, meta, engine = load_engine(args)

    t0 = time.time()
    results = run_probes(engine, tokenizer, probes, args.max_new_tokens, model.config.sequence_len,
                         tool_name=args.tool, verbose=args.verbose)
    elapsed = time.time() - t0
    per_category, total = summarize([(p, f) for p, f, _ in results])
    print_table(per_category, total)

    log_path = args.log or os.path.join(get_base_dir(), "probe_results.jsonl")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": args.source, "model_tag": args.model_tag,
        "step": meta.get("step", args.step), "probes": os.path.abspath(args.probes),
        "per_category": {c: passed / n for c, (passed, n) in per_category.items()},
        "total": total, "min_pass": args.min_pass, "passed_gate": total >= args.min_pass,
        "failed_ids": [p["id"] for p, f, _ in results if f], "seconds": round(elapsed, 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended result to {log_path}")
    if total < args.min_pass:
        print(f"GATE FAILED: total pass rate {total:.1%} < --min-pass {args.min_pass:.1%}")
        return 1
    print(f"gate passed: {total:.1%} >= {args.min_pass:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
