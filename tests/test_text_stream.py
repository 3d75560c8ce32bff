"""nanochat.text_stream: what the server and the CLI show of a reply while it streams must never change later:
multi-byte characters whole, think tags and stop strings never half-shown, tool blocks once closed, and the
concatenated deltas equal the parse of the whole turn."""
import pytest

from nanochat.text_stream import ReplyStream, TokenTextStream


def byte_tokens(tok, text):
    return tok.encode(text)  # one token per UTF-8 byte: every multi-byte character is split across tokens


def stream_all(tok, tokens, **kwargs):
    stream = ReplyStream(tok, **kwargs)
    deltas = []
    for t in tokens:
        deltas += stream.feed(t)
    deltas += stream.finish()
    return stream, deltas


def test_multibyte_characters_are_never_split(byte_tokenizer):
    text = "café 東京 🙂!"
    stream, deltas = stream_all(byte_tokenizer, byte_tokens(byte_tokenizer, text))
    assert all("\ufffd" not in d for _, d in deltas) and "".join(d for _, d in deltas) == text
    printer = TokenTextStream(byte_tokenizer)
    pieces = [printer.feed(t) for t in byte_tokens(byte_tokenizer, text)] + [printer.close()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_think_goes_to_reasoning_and_tags_are_never_shown(byte_tokenizer):
    S = byte_tokenizer.special
    tokens = byte_tokens(byte_tokenizer, "<think>let me see</think>The answer is 4.") + [S["<|assistant_end|>"]]
    stream, deltas = stream_all(byte_tokenizer, tokens)
    assert stream.text("reasoning") == "let me see" and stream.text("content") == "The answer is 4."
    assert not any("<" in d for _, d in deltas)  # byte by byte, a partial tag was never released
    assert stream.stopped


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>\nfirst line\nsecond\n</think>\nThe answer.", "first line\nsecond", "The answer."),
    ("<think>\n</think>\nThe answer.", "", "The answer."),  # think "off": the empty block shows nothing
    ("<think>\nstill going\n\n", "still going\n\n", ""),  # never closed: all reasoning, no answer
])
def test_the_think_templates_newlines_are_not_part_of_reasoning_or_answer(byte_tokenizer, text, reasoning, answer):
    """chat_format.think_block writes "<think>\\n...\\n</think>\\n"; streamed byte by byte, the reasoning and the
    answer are what was written between, and no delta is ever taken back (a held newline comes later if real)."""
    stream, deltas = stream_all(byte_tokenizer, byte_tokens(byte_tokenizer, text))
    assert stream.text("reasoning") == reasoning and stream.text("content") == answer
    assert "".join(d for k, d in deltas if k == "reasoning") == reasoning


def test_tool_blocks_are_items_once_closed(byte_tokenizer):
    S = byte_tokenizer.special
    tokens = (byte_tokens(byte_tokenizer, "It is ") + [S["<|python_start|>"]] + byte_tokens(byte_tokenizer, "6*7")
              + [S["<|python_end|>"], S["<|output_start|>"]] + byte_tokens(byte_tokenizer, "42")
              + [S["<|output_end|>"]] + byte_tokens(byte_tokenizer, " 42."))
    stream = ReplyStream(byte_tokenizer)
    seen = []
    for t in tokens:
        seen += stream.feed(t)
    kinds = [k for k, _ in seen]
    assert ("tool_call", "6*7") in seen and ("tool_output", "42") in seen
    assert kinds.index("tool_call") < kinds.index("tool_output")
    assert "".join(t for k, t in seen if k == "content") == "It is  42."


@pytest.mark.parametrize("stop, expected", [(["\n\n"], "one\ntwo"), (["two", "xyz"], "one\n"), (["zzz"], None)])
def test_stop_strings_cut_the_answer_and_are_never_shown(byte_tokenizer, stop, expected):
    text = "one\ntwo\n\nthree"
    stream, deltas = stream_all(byte_tokenizer, byte_tokens(byte_tokenizer, text), stop=stop)
    shown = "".join(d for _, d in deltas)
    assert shown == (text if expected is None else expected)
    assert stream.stopped


def test_raw_mode_is_all_content(byte_tokenizer):
    stream, deltas = stream_all(byte_tokenizer, byte_tokens(byte_tokenizer, "<think>x</think> y"), raw=True)
    assert deltas and all(k == "content" for k, _ in deltas) and stream.text() == "<think>x</think> y"
