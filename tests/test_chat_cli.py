"""chat_cli: one-shot and interactive use, clear/quit, streaming of tool calls and multi-byte characters, and a
conversation far longer than the model's context never crashes it (every prompt + answer fits)."""
import io
import os

import pytest

from scripts import chat_cli

SEQ_LEN = 48


@pytest.fixture
def tiny_sft(_isolated_base_dir, tiny_chat_tokenizer, build_tiny_checkpoint):
    """A tokenizer and a 2-layer model (context 48 tokens) saved as an SFT checkpoint."""
    sft_dir = os.path.join("chatsft_checkpoints", "d2")
    build_tiny_checkpoint(str(_isolated_base_dir), tiny_chat_tokenizer, SEQ_LEN, sft_dir, 5)
    return tiny_chat_tokenizer


def _run(argv, inputs=()):
    feed = iter(inputs)

    def fake_input(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError
    out = io.StringIO()
    chat_cli.main(["--device-type", "cpu", *argv], input_fn=fake_input, out=out)
    return out.getvalue()


def test_one_shot_prompt(tiny_sft):
    text = _run(["-p", "hello there, how are you?", "-t", "0", "-m", "8"])
    assert "Assistant: " in text and "Interactive Mode" not in text


def test_history_longer_than_context_never_crashes(tiny_sft, monkeypatch):
    from nanochat.engine import Engine
    seen = []
    original = Engine.generate

    def checked_generate(self, tokens, *args, **kwargs):
        seen.append((len(tokens), kwargs.get("max_tokens")))
        assert len(tokens) + kwargs["max_tokens"] <= SEQ_LEN
        yield from original(self, tokens, *args, **kwargs)
    monkeypatch.setattr(Engine, "generate", checked_generate)
    turns = [f"turn {i}: hello there, how are you? I am fine." for i in range(8)]
    turns.insert(4, "numbers " * 200)  # one message alone longer than the whole context
    text = _run(["-t", "0.8", "-m", "12"], turns + ["clear", "hello again", "quit"])
    assert len(seen) == len(turns) + 1  # every message got an answer
    assert "context full" in text
    assert "Conversation cleared." in text and text.rstrip().endswith("Goodbye!")
    # after 'clear' the history is empty again: the prompt is short
    assert seen[-1][0] < 20


def test_eof_ends_the_session(tiny_sft):
    text = _run(["-m", "4"], ["hello"])
    assert text.rstrip().endswith("Goodbye!")


def test_tool_call_tokens_round_trip_and_print(tiny_sft):
    tok = tiny_sft
    s = tok.encode_special
    content = [{"type": "text", "text": "4 + 3 = "}, {"type": "python", "text": "4+3"},
               {"type": "python_output", "text": "7"}, {"type": "text", "text": " so 7."}]
    ids, _ = tok.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}])
    generated = ids[ids.index(s("<|assistant_start|>")) + 1:]
    assert generated[-1] == s("<|assistant_end|>")
    assert chat_cli.tokens_to_parts(tok, generated) == content
    assert chat_cli.tokens_to_parts(tok, tok.encode("plain answer") + [s("<|assistant_end|>")]) == "plain answer"
    out = io.StringIO()
    printer = chat_cli.TokenPrinter(tok, out)
    for t in generated:
        printer.feed(t)
    printer.close()
    assert out.getvalue() == "4 + 3 = <<4+3=7>> so 7."


def test_printer_never_splits_a_multibyte_character(tiny_sft):
    tok = tiny_sft
    text = "café 東京 naïve"
    ids = tok.encode(text)
    out = io.StringIO()
    printer = chat_cli.TokenPrinter(tok, out)
    for t in ids:
        printer.feed(t)
        assert "\ufffd" not in out.getvalue()
    printer.close()
    assert out.getvalue() == text


def test_think_flag_and_command_prefill_and_report_no_answer(tiny_sft, monkeypatch):
    from nanochat.engine import Engine
    modes = []
    original = Engine.generate

    def recording_generate(self, tokens, *args, **kwargs):
        modes.append(kwargs.get("think"))
        yield from original(self, tokens, *args, **kwargs)
    monkeypatch.setattr(Engine, "generate", recording_generate)
    # a random model never closes the think block in 6 tokens: that is reported as no answer
    text = _run(["--think", "on", "-t", "0", "-m", "6"], ["hello", "/think", "hello", "/think default", "hello",
                                                          "/think on", "hello"])
    assert modes == ["on", "off", None, "on"]
    assert "Think mode: off" in text and "Think mode: on" in text
    assert "Assistant: <think>\n" in text
    assert text.count("(no answer: the reasoning was still going after 6 tokens") == 2  # the two "on" turns


def test_web_search_without_documents_is_a_user_error(tiny_sft, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_SEARCH_DOCS", raising=False)
    monkeypatch.delenv("NANOCHAT_SEARCH_URL", raising=False)
    for argv in (["--tools", "calculator,web_search"], ["--search", "auto"], ["--tools", "shell"]):
        with pytest.raises(SystemExit) as e:
            _run(["-p", "hi", *argv])
        assert e.value.code == 2
    assert "web_search needs something to search" in capsys.readouterr().err
