"""
Generated tokens -> text that can be shown as it arrives, without ever showing something that later changes.

- TokenTextStream: the chat CLI's view. Text as it is completed (a multi-byte character split across tokens is
  held until its last byte arrives), tool calls written inline as <<code=output>>, other special tokens silent.
- ReplyStream: the server's view of one assistant turn, as append-only items
      ("reasoning", text)   inside <think>...</think> at the start of the turn
      ("content", text)     the visible answer
      ("tool_call", code)   a <|python_start|>...<|python_end|> block, once it is closed
      ("tool_output", text) the tool's <|output_start|>...<|output_end|>, once it is closed
  feed(token) returns the new (kind, text) deltas; `stop` strings end the reply where they first appear in the
  answer (the stop string itself is not shown). Until a piece of text is final it is held back: an incomplete
  UTF-8 character, a partial "<think>"/"</think>" tag, a suffix that may be the start of a stop string.
  The turn is parsed by nanochat.chat_format.assistant_parts_from_tokens (the one parser); raw=True skips the
  chat structure (plain completions: all text is content).
"""

import re

from nanochat.chat_format import THINK_CLOSE, THINK_OPEN, assistant_parts_from_tokens

_BLOCK_OPENERS = ("<|python_start|>", "<|output_start|>")
_BLOCK_CLOSERS = ("<|python_end|>", "<|output_end|>")
_THINK_SPLIT = re.compile(f"({re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)})")


def _strip_incomplete_char(text):
    return text.rstrip("\ufffd")


def _partial_suffix(text, markers):
    """Length of the longest suffix of text that is a proper prefix of one of the markers."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


class TokenTextStream:
    """feed(token) -> the text to print now ("" while a character is incomplete); close() -> the rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.markup = {special("<|python_start|>"): "<<", special("<|python_end|>"): "=",
                       special("<|output_start|>"): "", special("<|output_end|>"): ">>"}
        self.silent = {special(s) for s in tokenizer.get_special_tokens()} - set(self.markup)
        self.pending = []

    def _flush(self, final):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        if text.endswith("\ufffd") and not final:
            return ""  # wait for the rest of the character
        self.pending = []
        return text

    def feed(self, token):
        if token in self.markup or token in self.silent:
            return self._flush(final=True) + self.markup.get(token, "")
        self.pending.append(token)
        return self._flush(final=False)

    def close(self):
        return self._flush(final=True)


class ReplyStream:

    def __init__(self, tokenizer, stop=(), raw=False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.raw = raw
        self.openers = {tokenizer.encode_special(name) for name in _BLOCK_OPENERS}
        self.block_tokens = self.openers | {tokenizer.encode_special(name) for name in _BLOCK_CLOSERS}
        self.end_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.tokens = []
        self.head_parts, self.tail_start = [], 0  # parts before the last block token are final: parse them once
        self.emitted = []                         # [kind, text] as sent so far
        self.stopped = False                      # a stop string (or the end of the turn) was reached

    def feed(self, token):
        """Add one generated token; returns the new [(kind, text)] deltas."""
        if self.stopped:
            return []
        if token in self.end_tokens:
            self.stopped = True
            return self._deltas(final=True)
        if token in self.block_tokens and not self.raw:
            self.head_parts = self._parse(self.tokens)
            self.tail_start = len(self.tokens)
        self.tokens.append(token)
        return self._deltas(final=False)

    def finish(self):
        """The generation ended (length, or cancelled): release everything held back."""
        deltas = [] if self.stopped else self._deltas(final=True)
        self.stopped = True
        return deltas

    def text(self, kind="content"):
        return "".join(text for k, text in self.emitted if k == kind)

    # ---

    def _parse(self, tokens):
        return assistant_parts_from_tokens(self.tokenizer, tokens) if tokens else []

    def _items(self, final):
        if self.raw:
            items = [["content", self.tokenizer.decode(self.tokens)]]
            return self._apply_stop(items, final)
        tail = self.tokens[self.tail_start:]
        parts = self.head_parts + self._parse(tail)
        if not final and tail and tail[0] in self.openers and parts:
            parts = parts[:-1]  # a tool block still being written: shown once it is closed
        items, in_think, started, just_toggled = [], False, False, False
        for part in parts:
            if part["type"] != "text":
                items.append(["tool_call" if part["type"] == "python" else "tool_output", part["text"]])
                started = True
                continue
            for piece in _THINK_SPLIT.split(part["text"]):
                if piece == THINK_OPEN and not started and not in_think:
                    in_think = just_toggled = True
                elif piece == THINK_CLOSE and in_think:
                    if items and items[-1][0] == "reasoning":  # the newline the think template puts before it
                        items[-1][1] = items[-1][1].removesuffix("\n")
                    in_think, started, just_toggled = False, True, True
                elif piece:
                    if just_toggled:  # the newline the think template puts after <think> and after </think>
                        piece, just_toggled = piece.removeprefix("\n"), False
                    kind = "reasoning" if in_think else "content"
                    started |= kind == "content" and bool(piece.strip())
                    if not piece:
                        continue
                    if items and items[-1][0] == kind:
                        items[-1][1] += piece
                    else:
                        items.append([kind, piece])
        items = [item for item in items if item[1] or item[0] in ("tool_call", "tool_output")]
        return self._apply_stop(items, final)

    def _apply_stop(self, items, final):
        """Cut the answer at the first stop string; hold back text that is not final yet."""
        for i, (kind, text) in enumerate(items):
            if kind != "content" or not self.stop:
                continue
            hits = [text.find(s) for s in self.stop if s in text]
            if hits:
                items[i][1] = text[:min(hits)]
                self.stopped = True
                return items[:i + 1]
        if final or not items:
            return items
        kind, text = items[-1]
        if kind in ("content", "reasoning"):
            text = _strip_incomplete_char(text)
            markers = [THINK_OPEN, THINK_CLOSE] if not self.raw else []
            if kind == "content":
                markers += self.stop
            text = text[:len(text) - _partial_suffix(text, markers)]
            if kind == "reasoning":  # its last newline may be the think template's, dropped once </think> comes
                text = text.removesuffix("\n")
            items[-1][1] = text
        return items

    def _deltas(self, final):
        deltas = []
        for i, (kind, text) in enumerate(self._items(final)):
            if i < len(self.emitted):
                sent = self.emitted[i][1]
                if len(text) > len(sent) and text.startswith(sent) and kind in ("content", "reasoning"):
                    deltas.append((kind, text[len(sent):]))
                    self.emitted[i][1] = text
            elif text or kind in ("tool_call", "tool_output"):
                deltas.append((kind, text))
                self.emitted.append([kind, text])
        return deltas
