"""
Filter an SFT pool: drop conversations whose assistant text shows artifacts (HTML tags, "Answer:" labels,
placeholder images, emoji spam, "as an AI language model", refusals, repeated lines, too-short answers).
The rules and their order are in nanochat/sft_filter.py.

    python -m scripts.filter_sft pool.jsonl [more.jsonl ...] --output kept.jsonl [--rejected dropped.jsonl]
        [--disable too_short] [--extra-rules my_rules.tsv]

Input rows are conversations (nanochat.chat_format: a list of messages or {"messages": [...], ...}). Kept rows
are written unchanged, byte for byte; each dropped row goes to --rejected as it was plus one key,
"filter_reason" (the first rule it matched). Files are streamed line by line, so any size works. A malformed row
stops the run with path:line for each bad row, and no output file is written (nor a half-written one left).
Prints a per-rule table; the last stdout line is the same numbers as one JSON object.
"""

import argparse
import json
import os
import sys

from tqdm import tqdm

from nanochat.chat_format import parse_conversation_line
from nanochat.fileio import atomic_open
from nanochat.sft_filter import RULE_NAMES, build_rules, first_matching_rule, load_extra_rules

MAX_ERRORS_SHOWN = 20
REASON_KEY = "filter_reason"


class MalformedInput(Exception):
    pass


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m scripts.filter_sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each rule's exact definition: the docstring of nanochat/sft_filter.py.")
    parser.add_argument("inputs", nargs="+", help="conversation JSONL files (read in order, streamed)")
    parser.add_argument("--output", required=True, help="JSONL of the kept rows, each exactly as in the input")
    parser.add_argument("--rejected", default=None,
                        help=f"also write the dropped rows here, each with a {REASON_KEY!r} key added")
    parser.add_argument("--disable", action="append", default=[], metavar="RULE",
                        help=f"switch a rule off (repeatable); built-in rules: {', '.join(RULE_NAMES)}")
    parser.add_argument("--extra-rules", default=None, metavar="FILE",
                        help="more rules, one `name<TAB>pattern` per line (`#` comments allowed), checked after "
                             "the built-in ones; patterns use Python regex syntax, `(?i)` for any case")
    return parser


def with_reason(raw, row, reason):
    """The input line plus one key. Spliced into the original bytes so the row stays exactly as it was."""
    text = raw.rstrip(b"\r\n")
    stripped = text.rstrip()
    reason_json = json.dumps(reason).encode()
    if stripped.startswith(b"["):  # a bare list of messages has nowhere to put a key: wrap it
        return b'{"messages": ' + stripped + b', "' + REASON_KEY.encode() + b'": ' + reason_json + b"}\n"
    if REASON_KEY in row:  # filtered before: replace the old reason rather than repeat the key
        row = {**row, REASON_KEY: reason}
        return json.dumps(row, ensure_ascii=False).encode() + b"\n"
    return stripped[:-1].rstrip() + b', "' + REASON_KEY.encode() + b'": ' + reason_json + b"}\n"


def filter_stream(paths, rules, kept_file, rejected_file):
    """Stream every row of `paths` through the rules. Returns (rows, counts per rule). Raises MalformedInput
    listing path:line of bad rows after reading everything (so one run reports them all)."""
    counts = {name: 0 for name, _ in rules}
    rows, errors = 0, []
    total_bytes = sum(os.path.getsize(path) for path in paths)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="filtering", file=sys.stderr) as progress:
        for path in paths:
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    progress.update(len(raw))
                    row, problems = parse_conversation_line(raw)
                    if problems:
                        errors.extend(f"{path}:{line_no}: {problem}" for problem in problems)
                        continue
                    if row is None:  # blank line
                        continue
                    rows += 1
                    reason = first_matching_rule(row["messages"], rules)
                    if reason is None:
                        kept_file.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    else:
                        counts[reason] += 1
                        if rejected_file is not None:
                            rejected_file.write(with_reason(raw, row, reason))
    if errors:
        shown = "\n".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise MalformedInput(f"{shown}{more}\nfilter_sft: {len(errors)} problem(s) in malformed rows; fix or remove "
                             f"those rows and rerun (nothing was written)")
    return rows, counts


def summary(rows, counts, disabled):
    dropped = sum(counts.values())
    percent = lambda n: round(100.0 * n / rows, 2) if rows else 0.0
    return {"rows": rows, "kept": rows - dropped, "dropped": dropped,
            "rules": {name: {"count": n, "percent": percent(n)} for name, n in counts.items()},
            "disabled": list(disabled)}


def print_table(stats):
    print(f"{'rule':<20} {'dropped':>10} {'% of rows':>10}")
    for name, entry in stats["rules"].items():
        print(f"{name:<20} {entry['count']:>10,} {entry['percent']:>10.2f}")
    rows = stats["rows"]
    for label, n in (("dropped (total)", stats["dropped"]), ("kept", stats["kept"]), ("rows", rows)):
        print(f"{label:<20} {n:>10,} {(100.0 * n / rows if rows else 0.0):>10.2f}")
    if stats["disabled"]:
        print(f"disabled: {', '.join(stats['disabled'])}")


def log_report(args, stats):
    """The drop table as the report's "SFT data filter" section."""
    from nanochat.report import get_report  # here: it loads torch (seconds) that filtering text never needs
    table = ["| rule | dropped | % of rows |", "|---|---:|---:|"]
    table += [f"| {name} | {entry['count']:,} | {entry['percent']:.2f} |" for name, entry in stats["rules"].items()]
    get_report().log(section="SFT data filter", data=[
        {"Inputs": ", ".join(args.inputs), "Output": args.output, "Disabled rules": ", ".join(args.disable) or "none",
         "Rows": stats["rows"], "Kept": stats["kept"], "Dropped": stats["dropped"]},
        "\n" + "\n".join(table) + "\n",  # a blank line first: markdown starts no table inside a list
    ])


def check_paths(args):
    """A user error as one line, or None."""
    for path in args.inputs:
        if not os.path.isfile(path):
            return f"input {path} does not exist (or is not a file)"
    outputs = [p for p in (args.output, args.rejected) if p is not None]
    inputs = {os.path.realpath(p) for p in args.inputs}
    for path in outputs:
        if os.path.realpath(path) in inputs:
            return f"{path} is also an input; write the output to another file"
    if args.rejected is not None and os.path.realpath(args.rejected) == os.path.realpath(args.output):
        return "--output and --rejected must be different files"
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = check_paths(args)
    if problem is None:
        try:
            extra = load_extra_rules(args.extra_rules) if args.extra_rules else []
            rules = build_rules(disable=args.disable, extra_rules=extra)
        except (OSError, ValueError) as e:
            problem = str(e)
    if problem is not None:
        print(f"filter_sft: error: {problem}", file=sys.stderr)
        return 2
    try:
        with atomic_open(args.output, "wb") as kept_file:
            if args.rejected is None:
                rows, counts = filter_stream(args.inputs, rules, kept_file, None)
            else:
                with atomic_open(args.rejected, "wb") as rejected_file:
                    rows, counts = filter_stream(args.inputs, rules, kept_file, rejected_file)
    except MalformedInput as e:
        print(e, file=sys.stderr)
        return 2
    stats = summary(rows, counts, args.disable)
    print_table(stats)
    log_report(args, stats)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
