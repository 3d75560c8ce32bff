"""
The Engine's search modes: when web_search runs without the model asking for it.

    "off"    only when the model calls it (a JSON web_search block);
    "auto"   also when nanochat.search_classifier says the question needs a search and the model did not search;
    "force"  the same, for every question.

Where the search goes in the turn: at the point where the answer would begin, that is right after </think> when
the turn has a think block (prefilled with think="on", or opened by the model), at the first token of the turn
when it has none (think="off" prefills a block that is already closed), and, if the model called another tool
there instead, right after that tool's output. Why there: it is where the training data puts a web_search call
(think -> search -> answer, scripts/gen_think_tool_data.py), so the model continues from a state it was trained
on and writes its answer from the results; inside the think block a tool call is malformed (the validator forbids
it), and once the answer has begun it is too late to ground it.

The model gets one token to search by itself: at that point, if the token it sampled is <|python_start|> it
writes its own call (a web_search call of its own settles the search; another tool's call moves the point to
after that tool's output); otherwise that one sampled token is replaced by the call
<|python_start|>{"tool": "web_search", "arguments": {"query": ...}}<|python_end|>, forced (mask 0), and the
Engine runs it like any call, so the results follow as <|output_start|>...<|output_end|>. The query is the last
user turn with its pronouns resolved from earlier turns (needs_web_search_contextual), the same text the
training data searches for.

The state is per row (AutoSearch), so a scheduler that batches requests can keep one per request.
"""

from nanochat.chat_format import THINK_CLOSE, THINK_OPEN, normalize_think
from nanochat.search_classifier import needs_web_search_contextual
from nanochat.tools import parse_tool_call, tool_call_json

SEARCH_MODES = ("off", "auto", "force")


def check_search_mode(mode):
    """The mode, or a ValueError naming the choices (None counts as "off")."""
    mode = "off" if mode is None else mode
    if mode not in SEARCH_MODES:
        raise ValueError(f"search must be one of {SEARCH_MODES}, got {mode!r}")
    return mode


def search_query(messages, mode):
    """The query to search for the last user turn of `messages` under `mode`, or None for no search."""
    if check_search_mode(mode) == "off":
        return None
    needed, query = needs_web_search_contextual(messages)
    if not query.strip() or (mode == "auto" and not needed):
        return None
    return query


def conversation_from_prompt(tokenizer, tokens):
    """The user and assistant turns of a rendered prompt (render_for_completion's ids) as messages, assistant turns
    as their text without tool blocks: what the classifier reads. A system message comes back merged into the
    first user turn, as rendering merged it."""
    special = tokenizer.encode_special
    starts = {special("<|user_start|>"): "user", special("<|assistant_start|>"): "assistant"}
    ends = {special("<|user_end|>"), special("<|assistant_end|>")}
    blocks = {special(name): name.endswith("start|>") for name in
              ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    messages, role, text, in_block = [], None, [], False
    for token in tokens:
        if token in starts:
            role, text, in_block = starts[token], [], False
        elif token in ends and role is not None:
            messages.append({"role": role, "content": tokenizer.decode(text)})
            role = None
        elif token in blocks:
            in_block = blocks[token]
        elif role is not None and not in_block and token != tokenizer.get_bos_token_id():
            text.append(token)
    return messages


def _could_open_think(text):
    text = text.lstrip()
    return bool(text) and (THINK_OPEN.startswith(text) or text.startswith(THINK_OPEN))


class AutoSearch:
    """One row's owed search. The Engine calls before(token) with each token the row sampled (while nothing is
    being forced) and gets back the tokens to force instead ([] = keep the sampled one), then after(token, ...)
    with each token the row emitted, sampled or forced."""

    def __init__(self, tokenizer, query, think=None):
        special = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.call_tokens = [self.python_start, *tokenizer.encode(tool_call_json("web_search", query=query)),
                            self.python_end]
        think = normalize_think(think)
        self.owed = True
        self.think_open = think == "on"
        self.at_decision = think != "on"  # "off": the prefilled block is closed; None: the first token decides
        self.first_token = think is None
        self.tail = ""      # the last characters of think text, to see </think>
        self.block = None   # the tokens of a tool call the model is writing

    def before(self, token):
        if not (self.owed and self.at_decision):
            return []
        text = "" if token == self.python_start else self.tokenizer.decode([token])
        if token != self.python_start and not text.strip():
            return []  # white space (the newline after </think>): the answer has not begun yet
        self.at_decision = False
        if token == self.python_start:
            return []  # the model calls a tool itself
        if self.first_token and _could_open_think(text):
            self.think_open = True  # nothing was prefilled and the model starts thinking: search once it closes
            return []
        self.owed = False
        return list(self.call_tokens)

    def after(self, token):
        """See the token the row took (sampled or forced). After a call the next sampled token is a place to search:
        a call's output, if it has one, is forced first, and callers ask before() only when nothing is forced."""
        self.first_token = False
        if token == self.python_start:
            self.block = []
        elif token == self.python_end and self.block is not None:
            if parse_tool_call(self.tokenizer.decode(self.block)).name == "web_search":
                self.owed = False
            self.block = None
            self.at_decision = True
        elif self.block is not None:
            self.block.append(token)
        elif self.think_open:
            self.tail = (self.tail + self.tokenizer.decode([token]))[-2 * len(THINK_CLOSE):]
            if THINK_CLOSE in self.tail:
                self.think_open, self.at_decision = False, True


def auto_search_rows(tokenizer, prompt_tokens, mode, think, num_rows):
    """One AutoSearch per row for a rendered prompt under `mode` (None each when there is nothing to search)."""
    if check_search_mode(mode) == "off":
        return [None] * num_rows
    query = search_query(conversation_from_prompt(tokenizer, prompt_tokens), mode)
    return [None if query is None else AutoSearch(tokenizer, query, think) for _ in range(num_rows)]
