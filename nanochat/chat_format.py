"""
The conversation format, and a validator for conversation files (JSONL) so nothing trains on broken rows.

One conversation per JSONL line, either a bare list of messages or {"messages": [...], ...other keys}:
    {"role": "system" | "user" | "assistant", "content": ...}
- an optional system message first, then user/assistant turns alternating, starting with user;
  training data ends with an assistant message.
- system/user content is a string. Assistant content is a string or a list of parts
  {"type": "text" | "python" | "python_output", "text": str}; each python_output directly follows the python
  part that produced it, at most one per call.
- reasoning is written inline in the assistant's text as <think>...</think>. One think block per assistant
  message, first (before any answer text or tool call), closed before any tool call, and followed by the answer:
  a message that ends inside the think block, or whose only text is inside it, is rejected ("answer inside
  think"). Think tags never appear in system/user messages.

Check files from the command line (exit status 1 if any row is bad):
    python -m nanochat.chat_format data/my_sft.jsonl [more.jsonl ...]
"""

import argparse
import re
import sys
import warnings

from nanochat.fileio import iter_jsonl, parse_jsonl_line

PART_TYPES = ("text", "python", "python_output")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_TAG = re.compile(r"</?think>")

# Think mode at inference (Engine think="on" | "off" | None = the model's default). The prefill is text the Engine
# puts after <|assistant_start|> before the model samples: "on" opens the think block; "off" writes an empty, closed
# one (Qwen3's enable_thinking=False convention) rather than nothing, because a model trained on think data decides
# for itself whether to think when nothing is prefilled, and a closed block is an unambiguous "reasoning is done",
# which the validator's one-think-block rule keeps it from reopening. None prefills nothing: what every model
# trained without think data (nanochat's own SFT) saw in training. The training data writes the same text
# (think_block), so the prefill is exactly the start of a trained turn.
THINK_MODES = ("on", "off")
THINK_PREFILL = {"on": THINK_OPEN + "\n", "off": THINK_OPEN + "\n" + THINK_CLOSE + "\n"}


def validate_conversation(messages, for_training=True):
    """Return a list of problems (human-readable strings); an empty list means the conversation is well-formed.

    messages: a list of messages or {"messages": [...]}. for_training: also require an assistant message last.
    """
    if isinstance(messages, dict):
        if "messages" not in messages:
            return ["object has no 'messages' key (expected {\"messages\": [...]} or a bare list of messages)"]
        messages = messages["messages"]
    if not isinstance(messages, list):
        return [f"messages must be a list, got {type(messages).__name__}"]
    if not messages:
        return ["conversation has no messages"]

    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"message {i}: expected an object with 'role' and 'content', got {type(message).__name__}")
        elif "role" not in message or "content" not in message:
            problems.append(f"message {i}: missing 'role' or 'content'")
        elif message["role"] not in ("system", "user", "assistant"):
            problems.append(f"message {i}: unknown role {message['role']!r} (expected system, user or assistant)")
    if problems:
        return problems

    # roles: [system] user assistant user assistant ...
    start = 1 if messages[0]["role"] == "system" else 0
    if start == 1 and len(messages) == 1:
        problems.append("conversation has only a system message")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            problems.append(f"message {i}: role is {messages[i]['role']!r} but should be {expected!r} "
                            f"(an optional system message, then user/assistant alternating from user)")
            break  # every later message would be off by one too; one report is enough
    if for_training and messages[-1]["role"] != "assistant":
        problems.append(f"last message is from {messages[-1]['role']!r}; training data must end with the assistant")

    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        where = f"message {i} ({role})"
        if role in ("system", "user"):
            if not isinstance(content, str):
                problems.append(f"{where}: content must be a string, got {type(content).__name__}")
            elif _THINK_TAG.search(content):
                problems.append(f"{where}: <think> tags only belong in assistant messages")
        else:
            problems.extend(f"{where}: {p}" for p in _assistant_problems(content))
    return problems


def _assistant_problems(content):
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        return [f"content must be a string or a list of parts, got {type(content).__name__}"]
    if not parts:
        return ["content is an empty list of parts"]

    problems = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            problems.append(f"part {j}: expected {{'type': ..., 'text': str}}, got {type(part).__name__}")
        elif part.get("type") not in PART_TYPES:
            problems.append(f"part {j}: unknown type {part.get('type')!r} (expected text, python or python_output)")
        elif not isinstance(part.get("text"), str):
            problems.append(f"part {j}: 'text' must be a string, got {type(part.get('text')).__name__}")
    if problems:
        return problems

    # tool calls: every python_output directly follows a python part, one output per call
    for j, part in enumerate(parts):
        if part["type"] == "python_output":
            previous = parts[j - 1]["type"] if j > 0 else None
            if previous == "python_output":
                problems.append(f"part {j}: more than one python_output after a python call")
            elif previous != "python":
                problems.append(f"part {j}: python_output without a python call right before it")

    # think: walk the text in order; state is "start" (nothing yet), "think" (inside), "after" (think closed),
    # "answer" (answer text or a tool call began with no think block before it)
    state, think_blocks, answered_after_think = "start", 0, False
    if not any(p["text"].strip() for p in parts if p["type"] == "text"):
        problems.append("assistant message has no text")
    for j, part in enumerate(parts):
        if part["type"] != "text":
            if part["type"] == "python" and state == "think":
                problems.append(f"part {j}: python call inside an unclosed <think> (close it with </think> first)")
            if state == "start":
                state = "answer"
            continue
        for piece in re.split(r"(</?think>)", part["text"]):
            if piece == THINK_OPEN:
                if state == "think":
                    problems.append(f"part {j}: <think> inside an open <think> block")
                elif think_blocks >= 1:
                    problems.append(f"part {j}: more than one <think> block")
                elif state == "answer":
                    problems.append(f"part {j}: <think> after the answer began; the think block must come first")
                else:
                    state, think_blocks = "think", think_blocks + 1
            elif piece == THINK_CLOSE:
                if state != "think":
                    problems.append(f"part {j}: </think> without an opening <think>")
                else:
                    state = "after"
            elif piece.strip():
                if state == "start":
                    state = "answer"
                elif state == "after":
                    answered_after_think = True
    if state == "think":
        problems.append("unclosed <think> (no </think> before the message ends)")
    elif think_blocks and not answered_after_think and not problems:
        problems.append("no answer text after </think>: the answer must follow the think block, not sit inside it")
    return problems


# -----------------------------------------------------------------------------
# Think mode: the text training data writes, the prefill inference uses, reasoning vs answer

def think_block(reasoning):
    """The think block as training data writes it (the text before the answer or the first tool call): an empty
    reasoning gives exactly the "off" prefill, any reasoning starts with the "on" prefill."""
    reasoning = reasoning.strip()
    return THINK_PREFILL["off"] if not reasoning else f"{THINK_PREFILL['on']}{reasoning}\n{THINK_CLOSE}\n"


def normalize_think(think):
    """"on"/True -> "on", "off"/False -> "off", None/""/"default" -> None (the model's default); else ValueError."""
    if think is None or think == "" or think == "default":
        return None
    if think is True or think == "on":
        return "on"
    if think is False or think == "off":
        return "off"
    raise ValueError(f"think must be 'on', 'off' or None (the model's default), got {think!r}")


def think_prefill(think):
    """The text the Engine prefills for a think mode ("" for None)."""
    think = normalize_think(think)
    return THINK_PREFILL[think] if think else ""


def model_think_default(meta):
    """A checkpoint's default think mode: what `chat_sft --think-default` recorded in its meta, else None."""
    meta = meta or {}
    recorded = meta.get("think_default", (meta.get("user_config") or {}).get("think_default"))
    return normalize_think(recorded)


def split_reasoning(text):
    """An assistant turn's visible text (tool blocks removed) -> (reasoning, answer).

    reasoning is the text inside a leading <think>...</think> ("" when there is none); answer is the text after
    it, or None when the think block never closed (the model ran out of tokens while thinking): that is "no
    answer", never the reasoning shown as an answer."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return "", text.strip()
    body = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        return body.strip(), None
    reasoning, answer = body.split(THINK_CLOSE, 1)
    return reasoning.strip(), answer.strip()


# -----------------------------------------------------------------------------
# Generated tokens -> an assistant message (the inverse of rendering one)

_BLOCK_TOKENS = {"<|python_start|>": ("python", True), "<|python_end|>": ("python", False),
                 "<|output_start|>": ("python_output", True), "<|output_end|>": ("python_output", False)}


def assistant_parts_from_tokens(tokenizer, tokens):
    """The token ids of one generated assistant turn -> its parts [{"type": "text"|"python"|"python_output",
    "text": str}], up to <|assistant_end|> or <|bos|>. Empty text between blocks is dropped, an empty tool block
    is kept (the model did open it); an unterminated block at the end is returned as what it was."""
    kinds = {tokenizer.encode_special(name): kind for name, kind in _BLOCK_TOKENS.items()}
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    parts, current, kind = [], [], "text"
    for token in tokens:
        if token in stop:
            break
        if token in kinds:
            if current or kind != "text":
                parts.append({"type": kind, "text": tokenizer.decode(current)})
            part_kind, opens = kinds[token]
            current, kind = [], (part_kind if opens else "text")
        else:
            current.append(token)
    if current or kind != "text":
        parts.append({"type": kind, "text": tokenizer.decode(current)})
    return parts


def assistant_content(parts):
    """Parts -> message content: a plain string when there are only text parts (so it renders like any reply),
    else the list of parts (so the history re-renders exactly as it was generated)."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def parse_conversation_line(raw, for_training=True):
    """One JSONL line (bytes) of a conversation file -> (row, problems): row is {"messages": [...], ...} (a bare
    list is wrapped), problems a list of strings (empty when the row is good). Blank lines give (None, [])."""
    row, problem = parse_jsonl_line(raw)
    if problem:
        return None, [problem]
    if row is None:
        return None, []
    return conversation_row(row, for_training)


def conversation_row(row, for_training=True):
    """A parsed JSONL value -> (row, problems) as parse_conversation_line returns them."""
    if isinstance(row, list):
        row = {"messages": row}
    elif not isinstance(row, dict):
        return None, [f"expected a list of messages or {{\"messages\": [...]}}, got {type(row).__name__}"]
    problems = validate_conversation(row, for_training=for_training)
    return (None if problems else row), problems


def load_conversations_jsonl(path, strict=True, for_training=True):
    """Read a JSONL file of conversations -> list of {"messages": [...], ...}.

    Each line is a bare list of messages or an object with "messages" (other keys are kept). Every bad row is
    reported as "path:LINE: reason": strict=True raises one ValueError listing them all; strict=False warns
    about each and skips it. Blank lines are ignored.
    """
    conversations, errors, bad_lines = [], [], set()
    for line_no, row, problem in iter_jsonl(path):
        row, problems = conversation_row(row, for_training) if problem is None else (None, [problem])
        if problems:
            bad_lines.add(line_no)
            errors.extend(f"{path}:{line_no}: {p}" for p in problems)
        else:
            conversations.append(row)
    if errors:
        if strict:
            raise ValueError(f"{path}: {len(bad_lines)} bad row(s); fix them (or load with strict=False to skip them):\n"
                             + "\n".join(errors))
        for e in errors:
            warnings.warn(f"skipping bad conversation row: {e}", stacklevel=2)
    if strict and not conversations and not errors:
        raise ValueError(f"{path}: no conversations found (the file is empty)")
    return conversations


def main(argv=None):
    parser = argparse.ArgumentParser(description="Validate conversation JSONL files (exit status 1 if any row is bad).")
    parser.add_argument("files", nargs="+", help="JSONL files, one conversation per line")
    parser.add_argument("--prompts", action="store_true",
                        help="the files hold prompts: the last message need not be from the assistant")
    args = parser.parse_args(argv)
    bad = False
    for path in args.files:
        try:
            conversations = load_conversations_jsonl(path, strict=True, for_training=not args.prompts)
        except (OSError, ValueError) as e:
            print(e if isinstance(e, ValueError) else f"{path}: cannot read: {e}")
            bad = True
            continue
        print(f"{path}: {len(conversations)} conversations OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
