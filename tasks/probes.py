"""
Probe suite: a JSONL of prompts, each with a category and pass rules, run against any checkpoint.

One probe per line:
    {"id": "identity-name", "category": "identity",
     "messages": [{"role": "user", "content": "What is your name?"}],
     "rules": [{"contains": "nanochat"}, {"no_tool": true}, {"max_chars": 400}]}

Optional keys: "think": "on" | "off" runs that probe in that think mode whatever --think says (a gate about think
mode); "with_tools": true marks a probe that needs web_search, run only under chat_probe --with-tools.

Rules (all must hold for a probe to pass):
    contains: str | [str, ...]       every string appears in the answer (case-insensitive)
    contains_any: [str, ...]         at least one appears (case-insensitive)
    not_contains: str | [str, ...]   none appears (case-insensitive)
    regex: str                       re.search matches the answer (re.S)
    not_regex: str                   re.search does not match
    calls_tool: "python" | "calculator" | "web_search" | "any"   the model called that tool (by name or a bare
                                     expression, nanochat.tools.parse_tool_call) / opened any tool block
    no_tool: true                    the model did not open a tool block
    tool_calls_valid: true           every tool block parses (known tool, JSON well-formed, arguments present)
    think_closed_before_answer: true if <think> appears it is closed, once, before any answer text
    thinks: true                     the turn starts with a think block holding some reasoning, closed before the
                                     answer (an empty block does not count)
    max_chars: int                   the answer is at most this long

"The answer" is the visible text of the assistant turn: tool calls and tool outputs are kept apart
(see ProbeOutput), and the text inside <think>...</think> is excluded from contains/regex rules; a think block
that never closed leaves no answer at all (nanochat.chat_format.split_reasoning).
"""

import re
from dataclasses import dataclass, field

from nanochat.chat_format import THINK_MODES, assistant_parts_from_tokens, split_reasoning
from nanochat.fileio import iter_jsonl
from nanochat.search_classifier import needs_web_search_contextual
from nanochat.tools import TOOL_NAMES, parse_tool_call

RULE_NAMES = ("contains", "contains_any", "not_contains", "regex", "not_regex", "calls_tool", "no_tool",
              "tool_calls_valid", "think_closed_before_answer", "thinks", "max_chars")
OPTIONAL_KEYS = ("think", "with_tools")


@dataclass
class ProbeOutput:
    """What the model produced in one assistant turn, split by kind."""
    raw_text: str                                   # everything, tool blocks included, as text
    text: str                                       # the visible text (no tool blocks)
    tool_calls: list = field(default_factory=list)  # list of (tool_name, code); tool_name None: malformed call
    tool_outputs: list = field(default_factory=list)

    @property
    def answer(self):
        """Visible text with the leading <think>...</think> reasoning removed ("" when the think never closed)."""
        return split_reasoning(self.text)[1] or ""


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
        elif name == "calls_tool" and arg not in (*TOOL_NAMES, "any"):
            problems.append(f"calls_tool must be one of {', '.join(TOOL_NAMES)} or 'any'")
    if probe.get("think") is not None and probe["think"] not in THINK_MODES:
        problems.append(f"think must be one of {', '.join(THINK_MODES)} (or left out)")
    if not isinstance(probe.get("with_tools", False), bool):
        problems.append("with_tools must be true or false")
    unknown = set(probe) - {"id", "category", "messages", "rules", *OPTIONAL_KEYS}
    if unknown:
        problems.append(f"unknown key(s) {sorted(unknown)} (known: id, category, messages, rules, "
                        f"{', '.join(OPTIONAL_KEYS)})")
    return problems


def load_probes(path):
    """Read a probe JSONL; raise ValueError listing every bad line as path:line: reason."""
    probes, errors, seen = [], [], set()
    for lineno, probe, problem in iter_jsonl(path):
        if problem is not None:
            errors.append(f"{path}:{lineno}: {problem}")
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
    if name == "tool_calls_valid":
        bad = [code for tool, code in output.tool_calls if tool is None]
        return f"malformed tool call {bad[0][:60]!r}" if bad else None
    if name == "think_closed_before_answer":
        return _check_think(output.text)
    if name == "thinks":
        reasoning, answer = split_reasoning(output.text)
        if not output.text.lstrip().startswith("<think>") or not reasoning:
            return "no reasoning in a <think> block"
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


def split_assistant_tokens(tokens, tokenizer, tools=TOOL_NAMES):
    """Turn the generated token ids of one assistant turn into a ProbeOutput; each tool call is named by the tool
    it calls among `tools` (as the Engine dispatches it), None when it is malformed."""
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    parts = assistant_parts_from_tokens(tokenizer, tokens)
    calls = [p["text"] for p in parts if p["type"] == "python"]
    return ProbeOutput(raw_text=tokenizer.decode(list(tokens[:end])),
                       text="".join(p["text"] for p in parts if p["type"] == "text"),
                       tool_calls=[(_tool_name(code, tools), code) for code in calls],
                       tool_outputs=[p["text"] for p in parts if p["type"] == "python_output"])


def _tool_name(code, tools):
    call = parse_tool_call(code, tuple(tools))
    return None if call.error else call.name


def summarize(results):
    """results: list of (probe, failures). Returns (per_category {cat: (passed, total)}, total_pass_rate)."""
    per_category = {}
    for probe, failures in results:
        passed, total = per_category.get(probe["category"], (0, 0))
        per_category[probe["category"]] = (passed + (not failures), total + 1)
    n_pass = sum(p for p, _ in per_category.values())
    n_total = sum(t for _, t in per_category.values())
    return per_category, (n_pass / n_total if n_total else 0.0)


def format_compliance(results):
    """How well the turns follow the format, over (probe, output, think_mode, with_tools) tuples:
    think_closed   turns run in think mode "on" whose think block closed before an answer;
    tool_calls_valid  tool calls that parse (known tool, well-formed JSON, arguments present);
    search_when_needed / no_search_when_not_needed  (runs with tools) probes the classifier says need a search
                   that called web_search, and probes it says need none that did not.
    Each is {"passed", "total", "rate"} (rate None when total is 0)."""
    counts = {name: [0, 0] for name in ("think_closed", "tool_calls_valid", "search_when_needed",
                                        "no_search_when_not_needed")}

    def count(name, ok):
        counts[name][0] += bool(ok)
        counts[name][1] += 1
    for probe, output, think, with_tools in results:
        if think == "on":
            count("think_closed", "</think>" in output.text and _check_think(output.text) is None)
        for tool, _ in output.tool_calls:
            count("tool_calls_valid", tool is not None)
        if with_tools:
            searched = any(tool == "web_search" for tool, _ in output.tool_calls)
            if needs_web_search_contextual(probe["messages"])[0]:
                count("search_when_needed", searched)
            else:
                count("no_search_when_not_needed", not searched)
    return {name: {"passed": p, "total": t, "rate": (p / t if t else None)} for name, (p, t) in counts.items()}
