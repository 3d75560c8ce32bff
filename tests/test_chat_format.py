"""Conversation validator and JSONL loader: each rule, line numbers, both line shapes, strict and lenient modes."""
import json
import subprocess
import sys

import pytest

from nanochat.chat_format import (THINK_PREFILL, load_conversations_jsonl, main, model_think_default, normalize_think,
                                  split_reasoning, think_block, think_prefill, validate_conversation)


def U(text):
    return {"role": "user", "content": text}


def A(content):
    return {"role": "assistant", "content": content}


def T(text):
    return {"type": "text", "text": text}


def PY(code):
    return {"type": "python", "text": code}


def OUT(text):
    return {"type": "python_output", "text": text}


GOOD = [
    [U("hi"), A("hello")],
    [{"role": "system", "content": "be nice"}, U("hi"), A("hello"), U("bye"), A("bye!")],
    [U("2+3?"), A([T("<think>add them</think>"), T("Let me check. "), PY("2+3"), OUT("5"), T("It is 5.")])],
    [U("2+3?"), A([T("<think>add them</think>"), PY("2+3"), OUT("5"), T("5")])],
    [U("q"), A("  <think>\nreasoning\n</think>\n\nThe answer.")],
    [U("q"), A([PY("1+1"), OUT("2"), PY("2*2"), OUT("4"), T("2 and 4")])],
    [U("q"), A([PY("print()"), T("no output captured, fine")])],
    [U("tell me about html tags like <b>"), A("They mark up text.")],
]

# (messages, substring expected in one of the problems)
BAD = [
    ([], "no messages"),
    ("just a string", "must be a list"),
    ([{"role": "system", "content": "s"}], "only a system message"),
    ([A("hi")], "should be 'user'"),
    ([U("a"), U("b"), A("c")], "should be 'assistant'"),
    ([U("a"), A("b"), {"role": "system", "content": "late"}, A("c")], "should be 'user'"),
    ([U("a"), {"role": "tool", "content": "x"}], "unknown role"),
    ([U("a"), {"role": "assistant"}], "missing 'role' or 'content'"),
    ([U("a"), "not a dict"], "expected an object"),
    ([U(["a"]), A("b")], "content must be a string"),
    ([{"role": "system", "content": 3}, U("a"), A("b")], "content must be a string"),
    ([U("a"), A(5)], "string or a list of parts"),
    ([U("a"), A([])], "empty list of parts"),
    ([U("a"), A([{"type": "image", "text": "x"}])], "unknown type"),
    ([U("a"), A([{"type": "text", "text": ["x"]}])], "'text' must be a string"),
    ([U("a"), A([{"type": "text"}])], "'text' must be a string"),
    ([U("a"), A(["bare string part"])], "part 0"),
    ([U("a"), A([PY("1"), OUT("1"), OUT("1"), T("ok")])], "more than one python_output"),
    ([U("a"), A([T("x"), OUT("1")])], "without a python call"),
    ([U("a"), A([OUT("1"), T("x")])], "without a python call"),
    ([U("a"), A("<think>never closed, the answer is 4")], "unclosed <think>"),
    ([U("a"), A("<think>the answer is 4</think>")], "no answer text after </think>"),
    ([U("a"), A("<think>the answer is 4</think>   \n")], "no answer text after </think>"),
    ([U("a"), A("<think>a</think>b<think>c</think>d")], "more than one <think>"),
    ([U("a"), A("<think>a<think>b</think></think>c")], "inside an open <think>"),
    ([U("a"), A("answer first <think>then think</think> more")], "think block must come first"),
    ([U("a"), A([PY("1+1"), OUT("2"), T("<think>late</think>2")])], "think block must come first"),
    ([U("a"), A("stray </think> close")], "without an opening <think>"),
    ([U("a"), A([T("<think>hmm"), PY("1+1"), OUT("2"), T("</think>2")])], "python call inside an unclosed"),
    ([U("<think>user thinks</think>"), A("b")], "only belong in assistant"),
    ([{"role": "system", "content": "<think>"}, U("a"), A("b")], "only belong in assistant"),
    ([U("a"), A("   ")], "has no text"),
    ([U("a"), A("b"), U("c")], "must end with the assistant"),
]


@pytest.mark.parametrize("messages", GOOD)
def test_good_conversations_have_no_problems(messages):
    assert validate_conversation(messages) == []
    assert validate_conversation({"messages": messages, "source": "x"}) == []


@pytest.mark.parametrize("messages,reason", BAD)
def test_each_rule_is_reported(messages, reason):
    problems = validate_conversation(messages)
    assert any(reason in p for p in problems), problems


def test_prompts_may_end_with_user():
    assert validate_conversation([U("a"), A("b"), U("c")], for_training=False) == []
    assert validate_conversation({"no": "messages"})[0].startswith("object has no 'messages'")


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_jsonl_both_shapes_and_metadata(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [
        json.dumps([U("hi"), A("hello")]),
        "",
        json.dumps({"messages": [U("q"), A("<think>x</think>y")], "source": "mine"}),
        "   ",
    ])
    conversations = load_conversations_jsonl(str(path))
    assert conversations == [{"messages": [U("hi"), A("hello")]},
                             {"messages": [U("q"), A("<think>x</think>y")], "source": "mine"}]


def bad_file(tmp_path):
    """Good rows at lines 1 and 6; every other line is bad for a different reason."""
    return write_lines(tmp_path / "mixed.jsonl", [
        json.dumps([U("hi"), A("hello")]),                    # 1 ok
        '{"messages": [',                                     # 2 invalid JSON
        json.dumps([U("a"), A("<think>unclosed")]),           # 3 unclosed think
        json.dumps({"conversation": []}),                     # 4 no messages key
        b"\xff\xfe not utf-8",                                # 5 bad encoding
        json.dumps({"messages": [U("q"), A("a")]}),           # 6 ok
        json.dumps("a string"),                               # 7 wrong top-level type
        json.dumps([U("a"), A([PY("1"), OUT("1"), OUT("1"), T("x")])]),  # 8 two outputs
        json.dumps([U("a"), A("b"), U("c")]),                 # 9 ends with user
    ])


def test_strict_reports_every_bad_row_with_line_numbers(tmp_path):
    path = bad_file(tmp_path)
    with pytest.raises(ValueError) as info:
        load_conversations_jsonl(str(path))
    message = str(info.value)
    assert "7 bad row(s)" in message
    for line_no, reason in [(2, "invalid JSON"), (3, "unclosed <think>"), (4, "no 'messages' key"),
                            (5, "not valid UTF-8"), (7, "expected a list of messages"),
                            (8, "more than one python_output"), (9, "must end with the assistant")]:
        assert f"{path}:{line_no}: " in message and reason in message.split(f"{path}:{line_no}: ", 1)[1].split("\n")[0]
    assert f"{path}:1:" not in message and f"{path}:6:" not in message


def test_lenient_warns_and_skips(tmp_path):
    path = bad_file(tmp_path)
    with pytest.warns(UserWarning) as record:
        conversations = load_conversations_jsonl(str(path), strict=False)
    assert conversations == [{"messages": [U("hi"), A("hello")]}, {"messages": [U("q"), A("a")]}]
    warned_lines = {int(str(w.message).split(f"{path}:", 1)[1].split(":")[0]) for w in record}
    assert warned_lines == {2, 3, 4, 5, 7, 8, 9}


def test_empty_file_is_an_error_when_strict(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no conversations"):
        load_conversations_jsonl(str(path))
    assert load_conversations_jsonl(str(path), strict=False) == []


def test_cli_exit_status(tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps([U("hi"), A("hello")])])
    assert main([str(good)]) == 0
    assert "1 conversations OK" in capsys.readouterr().out
    bad = bad_file(tmp_path)
    assert main([str(good), str(bad)]) == 1
    assert f"{bad}:3:" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.jsonl")]) == 1
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps([U("hi")])])
    assert main([str(prompts)]) == 1 and main(["--prompts", str(prompts)]) == 0


def test_module_entry_point(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ["{nope"])
    result = subprocess.run([sys.executable, "-m", "nanochat.chat_format", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and f"{bad}:1: invalid JSON" in result.stdout


# -----------------------------------------------------------------------------
# think mode helpers

def test_think_blocks_are_the_prefills_and_validate():
    assert think_block("") == think_block("  \n") == THINK_PREFILL["off"] == "<think>\n</think>\n"
    block = think_block("  add them  ")
    assert block == "<think>\nadd them\n</think>\n" and block.startswith(THINK_PREFILL["on"])
    for block in (think_block(""), think_block("add them")):
        assert validate_conversation([U("2+3?"), A(block + "5")]) == []
        assert validate_conversation([U("2+3?"), A([T(block), PY("2+3"), OUT("5"), T("5")])]) == []
    assert think_prefill("on") == "<think>\n" and think_prefill(None) == "" and think_prefill(False) == THINK_PREFILL["off"]


def test_normalize_think_and_the_model_default():
    assert [normalize_think(v) for v in ("on", True, "off", False, None, "", "default")] == \
        ["on", "on", "off", "off", None, None, None]
    with pytest.raises(ValueError, match="think must be"):
        normalize_think("yes")
    assert model_think_default({"user_config": {"think_default": "on"}}) == "on"
    assert model_think_default({"think_default": "off", "user_config": {"think_default": "on"}}) == "off"
    assert model_think_default({"user_config": {"lr": 1}}) is None and model_think_default(None) is None


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>\nlook it up\n</think>\nIt is sunny.", "look it up", "It is sunny."),
    ("  <think></think>Hi", "", "Hi"),
    ("No think at all.", "", "No think at all."),
    ("<think>\nstill thinking when the budget ran out", "still thinking when the budget ran out", None),
    ("<think>a</think>", "a", ""),
])
def test_split_reasoning_never_shows_unclosed_reasoning_as_the_answer(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)
