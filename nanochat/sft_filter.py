"""
The hard filter for an SFT pool: a conversation is dropped when the assistant's text shows an artifact that
leaks into a model's answers (HTML bold, "Answer:" labels, placeholder images, emoji spam, "as an AI language
model", ...). Only assistant text is checked: a user may write anything, the model should not learn to.

Rules, in the order they are checked (the first that matches is the reason a row is dropped):
  html_tags          <b> <i> <strong> <em> <u> or their closing forms (any case, name=value attributes allowed;
                     <br>, <img>, <ul> are other tags, and "a<b and b>c" is math)
  stock_labels       a message that starts with "Answer:", "Response:", "Final answer:" or "Q:" (any case; also
                     right after a closing </think>)
  placeholder_image  a markdown image ![...] with no (url) after it
  emoji_spam         3 or more emoji in a row (spaces/tabs between them allowed). An emoji is what displays as
                     one: a character with Emoji_Presentation, or a pictograph + U+FE0F, with its skin tone, ZWJ
                     joins (a family is one emoji), flags and keycaps as single emoji
  ai_hedge           "as an AI language model" (any case)
  refusal            "I cannot provide" (any case)
  repeated_lines     the same non-blank line three times in a row
  too_short          all of the conversation's assistant text together is at most 40 characters (stripped);
                     counted over the whole conversation so a multi-turn chat ending "You're welcome!" stays
The regex rules look at each assistant message's text: a string content, or its "text" parts joined by newlines
(python calls and tool outputs are code and tool text, not prose, and are not checked).

Extra rules come from a file (load_extra_rules): one `name<TAB>pattern` per line, `#` comments and blank lines
ignored; patterns use the `regex` module's syntax (Python `re` plus \\p{...} classes; `(?i)` for any case) and
are checked after the built-in ones, in file order.

Why the `regex` module: it already tokenizes for us (tiktoken needs it), runs in C on files of any size, and
knows Unicode's emoji properties, so the emoji rule follows Unicode's own definition instead of a hand-kept list
of code point ranges.
"""

import regex

TOO_SHORT_CHARS = 40

_EMOJI_BASE = r"(?:\p{Emoji_Presentation}|\p{Extended_Pictographic}\uFE0F)\p{Emoji_Modifier}?"
# one emoji: a flag (two regional indicators), a keycap, or a pictograph with its optional tag sequence (the
# subdivision flags), then any ZWJ-joined pictographs; atomic, so a skin tone is never counted as its own emoji
_ONE_EMOJI = (r"(?>(?:\p{Regional_Indicator}{2}|[#*0-9]\uFE0F?\u20E3|" + _EMOJI_BASE
              + r"[\U000E0020-\U000E007E]*\U000E007F?)(?:\u200D(?:" + _EMOJI_BASE + r"|\p{Extended_Pictographic}))*)")

REGEX_RULES = [
    ("html_tags", regex.compile(r"</?(?:b|i|strong|em|u)(?:\s+[\w-]+=[^<>]*)?\s*>", regex.IGNORECASE)),
    ("stock_labels", regex.compile(r"(?:\A|</think>)\s*(?:answer|response|final answer|q):", regex.IGNORECASE)),
    ("placeholder_image", regex.compile(r"!\[[^\]\n]*\](?!\(\s*[^\s)])")),
    ("emoji_spam", regex.compile(r"(?:" + _ONE_EMOJI + r"[ \t]*){3,}")),
    ("ai_hedge", regex.compile(r"\bas\s+an\s+ai\s+language\s+model\b", regex.IGNORECASE)),
    ("refusal", regex.compile(r"\bi\s+cannot\s+provide\b", regex.IGNORECASE)),
    # the lookahead keeps whitespace-only lines out and costs one scan of the line (a `.*\S.*` group would
    # backtrack quadratically on long lines)
    ("repeated_lines", regex.compile(r"^(?=[^\n]*\S)([^\n]+)\n\1\n\1$", regex.MULTILINE)),
]
TOO_SHORT = "too_short"
RULE_NAMES = [name for name, _ in REGEX_RULES] + [TOO_SHORT]


def assistant_texts(messages):
    """The text of each assistant message: a string content, or its "text" parts joined by newlines."""
    texts = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.append("\n".join(part["text"] for part in content if part.get("type") == "text"))
    return texts


def load_extra_rules(path):
    """A rules file -> [(name, compiled pattern)]: one `name<TAB>pattern` per line; raises ValueError naming
    path:line for a malformed line, a bad pattern or a name used twice."""
    rules, seen = [], set(RULE_NAMES)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, tab, pattern = line.partition("\t")
            name = name.strip()
            if not tab or not name or not pattern:
                raise ValueError(f"{path}:{line_no}: expected `name<TAB>pattern`, got {line!r}")
            if name in seen:
                raise ValueError(f"{path}:{line_no}: rule name {name!r} is already taken; pick another")
            try:
                compiled = regex.compile(pattern)
            except regex.error as e:
                raise ValueError(f"{path}:{line_no}: rule {name!r}: bad pattern {pattern!r}: {e}") from None
            seen.add(name)
            rules.append((name, compiled))
    return rules


def build_rules(disable=(), extra_rules=()):
    """The active rules in checking order: the built-in ones less `disable`, then `extra_rules`
    ([(name, compiled pattern)]); too_short is represented by its name with pattern None."""
    rules = REGEX_RULES + [(TOO_SHORT, None)] + list(extra_rules)
    names = [name for name, _ in rules]
    unknown = [name for name in disable if name not in names]
    if unknown:
        raise ValueError(f"unknown rule(s) to disable: {', '.join(unknown)}; the rules are {', '.join(names)}")
    return [(name, pattern) for name, pattern in rules if name not in disable]


def first_matching_rule(messages, rules):
    """The name of the first rule (in `rules` order) that the assistant's text matches, or None to keep."""
    texts = assistant_texts(messages)
    for name, pattern in rules:
        if pattern is None:
            if sum(len(text.strip()) for text in texts) <= TOO_SHORT_CHARS:
                return name
        elif any(pattern.search(text) for text in texts):
            return name
    return None
