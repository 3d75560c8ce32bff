"""
Probe suite: a JSONL of prompts, each with a category and pass rules, run against any checkpoint.

One probe per line:
    {"id": "identity-name", "category": "identity",
     "messages": [{"role": "user", "content": "What is your name?"}],
     "rules": [{"contains": "nanochat"}, {"no_tool": true}, {"max_chars": 400}]}

Rules (all must hold for a probe to pass):
    contains: str | [str, ...]       every string appears in the answer (case-insensitive)
    contains_any: [str, ...]         at least one appears (case-insensitive)
    not_contains: str | [str, ...]   none appears (case-insensitive)
    regex: str                       re.search matches the answer (re.S)
    not_regex: str                   re.search does not match
    calls_tool: "python" | "calculator" | "any"   the model opened a tool block
    no_tool: true                    the model did not open a tool block
    think_closed_before_answer: true if <think> appears it is closed, once, before any answer text
    max_chars: int                   the answer is at most this long

"The answer" is the visible text of the assistant turn: tool calls and tool outputs are kept apart
(see ProbeOutput), and the text inside <think>...</think> is excluded from contains/regex rules.
"""

import json
import re
from dataclasses import dataclass, field

from nanochat.chat_format import assistant_parts_from_tokens

RULE_NAMES = ("contains", "contains_any", "not_contains", "regex", "not_regex", "calls_tool", "no_tool",
              "think_closed_before_answer", "max_chars")


@dataclass
class ProbeOutput:
    """What the model produced in one assistant turn, split by kind."""
    raw_text: str                                   # everything, tool blocks included, as text
    text: str                                       # the visible text (no tool blocks)
    tool_calls: list = field(default_factory=list)  # list of (tool_name, code)
    tool_outputs: list = field(default_factory=list)

    @property
    def answer(self):
        """Visible text with any <think>...</think> reasoning removed."""
        return re.sub(r"<think>.*?(</think>|$)", "", self.text, flags=re.S).strip()


def _as_list(value):
    return [value] if isinstance(value, str) else list(value)


def validate_probe(probe):
    """Return a list of problems with one probe dict (empty = fine)."""
    problems = []
    for key in ("id", "category", "messages", "rules"):
        if key not in probe:
            problems.append(f"missing key {key!r}")
    if problems:
        return problems
    if not isinstance(probe["messages"], list) or not probe["messages"]:
        problems.append("messages must be a non-empty list")
    elif probe["messages"][-1].get("role") != "user":
        problems.append("the last message must be from the user (the model answers it)")
    if not isinstance(probe["rules"], list) or not probe["rules"]:
        problems.append("rules must be a non-empty list of one-key dicts")
        return problems
    for rule in probe["rules"]:
        if not isinstance(rule, dict) or len(rule) != 1:
            problems.append(f"rule {rule!r} must be a dict with exactly one key")
            continue
        (name, arg), = rule.items()
        if name not in RULE_NAMES:
            problems.append(f"unknown rule {name!r} (known: {', '.join(RULE_NAMES)})")
        elif name in ("regex", "not_regex"):
            try:
                re.compile(arg)
            except re.error as e:
                problems.append(f"bad regex {arg!r}: {e}")
        elif name == "max_chars" and not (isinstance(arg, int) and arg > 0):
            problems.append("max_chars needs a positive integer")
        elif name == "calls_tool" and arg not in ("python", "calculator", "any"):
            problems.append("calls_tool must be 'python', 'calculator' or 'any'")
    return problems


def load_probes(path):
    """Read a probe JSONL; raise ValueError listing every bad line as path:line: reason."""
    probes, errors, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                probe = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(probe, dict):
                errors.append(f"{path}:{lineno}: a probe must be a JSON object")
                continue
            problems = validate_probe(probe)
            if probe.get("id") in seen:
                problems.append(f"duplicate id {probe['id']!r}")
            seen.add(probe.get("id"))
            errors.extend(f"{path}:{lineno}: {p}" for p in problems)
            if not problems:
                probes.append(probe)
    if errors:
        raise ValueError("bad probe file:\n" + "\n".join(errors))
    if not probes:
        raise ValueError(f"{path} has no probes")
    return probes


def check_rule(rule, output):
    """Return None if the rule holds, else a short reason."""
    (name, arg), = rule.items()
    answer = output.answer
    low = answer.lower()
    if name == "contains":
        missing = [s for s in _as_list(arg) if s.lower() not in low]
        return f"missing {missing}" if missing else None
    if name == "contains_any":
        return None if any(s.lower() in low for s in _as_list(arg)) else f"none of {list(_as_list(arg))}"
    if name == "not_contains":
        found = [s for s in _as_list(arg) if s.lower() in low]
        return f"contains {found}" if found else None
    if name == "regex":
        return None if re.search(arg, answer, flags=re.S) else f"no match for /{arg}/"
    if name == "not_regex":
        return f"matches /{arg}/" if re.search(arg, answer, flags=re.S) else None
    if name == "calls_tool":
        names = [tool for tool, _ in output.tool_calls]
        ok = bool(names) if arg == "any" else arg in names
        return None if ok else f"did not call {arg} (calls: {names})"
    if name == "no_tool":
        return f"called a tool: {output.tool_calls[0][1][:60]!r}" if output.tool_calls else None
    if name == "think_closed_before_answer":
        return _check_think(output.text)
    if name == "max_chars":
        return None if len(answer) <= arg else f"{len(answer)} chars > {arg}"
    raise ValueError(f"unknown rule {name!r}")


def _check_think(text):
    opens, closes = text.count("<think>"), text.count("</think>")
    if opens == 0 and closes == 0:
        return None
    if opens != 1 or closes != 1:
        return f"expected one <think>…</think> block, found {opens} open / {closes} close"
    start, end = text.index("<think>"), text.index("</think>")
    if end < start:
        return "</think> before <think>"
    if text[:start].strip():
        return "answer text before <think>"
    if not text[end + len("</think>"):].strip():
        return "no answer after </think>"
    return None


def check_probe(probe, output):
    """List of (rule, reason) failures for one probe's output (empty = pass)."""
    failures = []
    for rule in probe["rules"]:
        reason = check_rule(rule, output)
        if reason is not None:
            failures.append((rule, reason))
    return failures


def split_assistant_tokens(tokens, tokenizer, tool_name="calculator"):
    """Turn the generated token ids of one assistant turn into a ProbeOutput."""
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    parts = assistant_parts_from_tokens(tokenizer, tokens)
    return ProbeOutput(raw_text=tokenizer.decode(list(tokens[:end])),
                       text="".join(p["text"] for p in parts if p["type"] == "text"),
                       tool_calls=[(tool_name, p["text"]) for p in parts if p["type"] == "python"],
                       tool_outputs=[p["text"] for p in parts if p["type"] == "python_output"])


def summarize(results):
    """results: list of (probe, failures). Returns (per_category {cat: (passed, total)}, total_pass_rate)."""
    per_category = {}
    for probe, failures in results:
        passed, total = per_category.get(probe["category"], (0, 0))
        per_category[probe["category"]] = (passed + (not failures), total + 1)
    n_pass = sum(p for p, _ in per_category.values())
    n_total = sum(t for _, t in per_category.values())
    return per_category, (n_pass / n_total if n_total else 0.0)
