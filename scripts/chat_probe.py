"""
Run the probe suite against a checkpoint and gate on the pass rate.

    python -m scripts.chat_probe -i sft                       # default probes shipped in tasks/data/probes.jsonl
    python -m scripts.chat_probe -i sft --probes my.jsonl --min-pass 0.9
    python -m scripts.chat_probe -i sft --think on --with-tools   # the think/tool gates too (web_search offline)

Prints a pass table per category, appends one result line (model, step, think mode, per-category and total pass
rates, format compliance, time) to a JSONL log, and exits with status 1 when the total pass rate is below
--min-pass. Probes marked "with_tools" (they need web_search) run only under --with-tools, which enables the
calculator, python and web_search (searching $NANOCHAT_SEARCH_URL if set, else --search-docs, by default the
fictional demo documents); without it the calculator alone runs, as in nanochat. A probe's own "think" key beats
--think, which beats the model's default (chat_sft --think-default).
"""

import argparse
import json
import os
import sys
import time

from nanochat.chat_format import model_think_default, normalize_think
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, get_base_dir
from nanochat.engine import Engine
from nanochat.tools import TOOL_NAMES
from nanochat.web_search import DEMO_DOCS_DIR, SEARCH_DOCS_ENV, provider_from_env
from tasks.probes import check_probe, format_compliance, load_probes, split_assistant_tokens, summarize

DEFAULT_PROBES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "data", "probes.jsonl")


def generate_answer(engine, tokenizer, messages, max_new_tokens, seq_len, think=None, search="off"):
    """Greedy answer to the last user message; returns the assistant turn's token ids (a think prefill included)."""
    conversation = {"messages": list(messages) + [{"role": "assistant", "content": ""}]}
    prompt = tokenizer.render_for_completion(conversation)
    seq_len -= len(engine.think_prefill_tokens(think))  # room for the think prefill
    if len(prompt) >= seq_len:
        prompt = prompt[:1] + prompt[-(seq_len - 1 - max_new_tokens):] if seq_len - 1 - max_new_tokens > 0 else prompt[-(seq_len // 2):]
    max_new_tokens = max(1, min(max_new_tokens, seq_len - len(prompt)))
    generated = []
    for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_new_tokens, temperature=0.0,
                                           think=think, search=search):
        generated.append(token_column[0])
    return generated


def run_probes(engine, tokenizer, probes, max_new_tokens=256, seq_len=2048, think=None, search="off",
               with_tools=False, verbose=False):
    """Run every probe; returns a list of (probe, failures, output, think mode used)."""
    tools = TOOL_NAMES if with_tools else ("calculator",)
    results = []
    for probe in probes:
        probe_think = probe.get("think") or think or engine.think_default
        tokens = generate_answer(engine, tokenizer, probe["messages"], max_new_tokens, seq_len, probe_think,
                                 search)
        output = split_assistant_tokens(tokens, tokenizer, tools=tools)
        failures = check_probe(probe, output)
        results.append((probe, failures, output, probe_think))
        if verbose:
            status = "PASS" if not failures else "FAIL " + "; ".join(r for _, r in failures)
            print(f"[{probe['id']}] {status}\n    {output.raw_text[:300]!r}")
    return results


def print_table(per_category, total):
    width = max([len(c) for c in per_category] + [8])
    print(f"{'category':<{width}}  passed  total   rate")
    for category, (passed, n) in sorted(per_category.items()):
        print(f"{category:<{width}}  {passed:>6}  {n:>5}  {passed / n:6.1%}")
    print(f"{'TOTAL':<{width}}  {sum(p for p, _ in per_category.values()):>6}  "
          f"{sum(n for _, n in per_category.values()):>5}  {total:6.1%}")


def print_compliance(compliance):
    print("format compliance:")
    for name, c in compliance.items():
        rate = "n/a" if c["rate"] is None else f"{c['rate']:.1%}"
        print(f"  {name:<26} {c['passed']:>4}/{c['total']:<4} {rate}")


def load_engine(args):
    """(model, tokenizer, meta, engine) for the checkpoint named by the CLI flags."""
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    provider = provider_from_env(args.search_docs) if args.with_tools else None
    tools = list(TOOL_NAMES) if args.with_tools else args.tool
    engine = Engine(model, tokenizer, tools=tools, search_provider=provider, think_default=model_think_default(meta))
    return model, tokenizer, meta, engine


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", default="sft", help="checkpoint kind: base|sft|rl|dpo (default sft)")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("--probes", default=DEFAULT_PROBES, help="probe JSONL (default: tasks/data/probes.jsonl)")
    parser.add_argument("--min-pass", type=float, default=0.95, help="gate: minimum total pass rate (default 0.95)")
    parser.add_argument("--log", default=None, help="JSONL to append the result line to "
                                                    "(default $NANOCHAT_BASE_DIR/probe_results.jsonl)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512,
                        help="tokens per probe answer (capped by the context; forced tool outputs count too)")
    parser.add_argument("--tool", default="calculator", choices=["calculator", "python"],
                        help="without --with-tools: which tool runs <|python_start|> blocks")
    parser.add_argument("--with-tools", action="store_true",
                        help="enable calculator, python and web_search, and run the probes marked with_tools")
    parser.add_argument("--search-docs", default=None,
                        help=f"with --with-tools: the document folder web_search searches (default ${SEARCH_DOCS_ENV}, "
                             f"else the demo documents {DEMO_DOCS_DIR})")
    parser.add_argument("--search", default="off", choices=["off", "auto", "force"],
                        help="with --with-tools: let the Engine search when the model does not (default off: measure "
                             "what the model does by itself)")
    parser.add_argument("--think", default=None, choices=["on", "off"],
                        help="think mode for probes without their own (default: the model's)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every probe's output")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.search != "off" and not args.with_tools:
        print("ERROR: --search auto|force needs --with-tools (web_search must be enabled)", file=sys.stderr)
        return 2
    if args.with_tools and not args.search_docs and not os.environ.get(SEARCH_DOCS_ENV):
        args.search_docs = DEMO_DOCS_DIR
    try:
        probes = load_probes(args.probes)  # fail on a bad probe file before loading a model
    except (OSError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    skipped = [p["id"] for p in probes if p.get("with_tools") and not args.with_tools]
    probes = [p for p in probes if not (p.get("with_tools") and not args.with_tools)]
    if skipped:
        print(f"skipping {len(skipped)} probe(s) that need web_search (run with --with-tools): {', '.join(skipped)}")

    model, tokenizer, meta, engine = load_engine(args)
    think = normalize_think(args.think)

    t0 = time.time()
    results = run_probes(engine, tokenizer, probes, args.max_new_tokens, model.config.sequence_len, think=think,
                         search=args.search, with_tools=args.with_tools, verbose=args.verbose)
    elapsed = time.time() - t0
    per_category, total = summarize([(p, f) for p, f, _, _ in results])
    compliance = format_compliance([(p, o, t, args.with_tools) for p, _, o, t in results])
    print_table(per_category, total)
    print_compliance(compliance)

    log_path = args.log or os.path.join(get_base_dir(), "probe_results.jsonl")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": args.source, "model_tag": args.model_tag,
        "step": meta.get("step", args.step), "probes": os.path.abspath(args.probes),
        "think": think or engine.think_default, "with_tools": args.with_tools, "search": args.search,
        "per_category": {c: passed / n for c, (passed, n) in per_category.items()},
        "per_category_counts": {c: [passed, n] for c, (passed, n) in per_category.items()},
        "total": total, "min_pass": args.min_pass, "passed_gate": total >= args.min_pass,
        "format_compliance": compliance,
        "failed_ids": [p["id"] for p, f, _, _ in results if f], "skipped_ids": skipped, "seconds": round(elapsed, 2),
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
