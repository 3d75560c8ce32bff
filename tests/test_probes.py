import json

import pytest

from tasks.probes import ProbeOutput, check_rule, load_probes, split_assistant_tokens, summarize

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, specials follow: enough to exercise the probe plumbing."""

    def encode_special(self, s):
        return 256 + SPECIALS.index(s)

    def get_bos_token_id(self):
        return 256

    def encode(self, s):
        return list(s.encode("utf-8"))

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            out += bytes([i]) if i < 256 else SPECIALS[i - 256].encode()
        return out.decode("utf-8", errors="replace")


def out(text, tool_calls=()):
    return ProbeOutput(raw_text=text, text=text, tool_calls=list(tool_calls))


@pytest.mark.parametrize("rule, passing, failing", [
    ({"contains": "nanochat"}, out("I am NanoChat."), out("I am a bot.")),
    ({"contains": ["a", "b"]}, out("a b"), out("a")),
    ({"contains_any": ["x", "y"]}, out("y!"), out("z")),
    ({"not_contains": ["<b>", "Answer:"]}, out("Paris."), out("Answer: Paris")),
    ({"not_contains": "<b>"}, out("plain"), out("<b>bold</b>")),
    ({"regex": r"\b42\b"}, out("it is 42."), out("it is 420")),
    ({"not_regex": r"\d"}, out("none"), out("1")),
    ({"calls_tool": "calculator"}, out("", [("calculator", "1+1")]), out("2")),
    ({"calls_tool": "any"}, out("", [("python", "print(1)")]), out("2")),
    ({"no_tool": True}, out("2"), out("", [("calculator", "1+1")])),
    ({"think_closed_before_answer": True}, out("<think>add</think>4"), out("<think>add 4")),
    ({"think_closed_before_answer": True}, out("just 4"), out("4 <think>x</think> 5")),
    ({"max_chars": 5}, out("short"), out("too long")),
])
def test_each_rule_passes_and_fails(rule, passing, failing):
    assert check_rule(rule, passing) is None
    assert check_rule(rule, failing) is not None


def test_think_text_is_not_the_answer():
    # a word that only appears inside the reasoning must not satisfy "contains"
    assert check_rule({"contains": "paris"}, out("<think>maybe paris?</think>Lyon")) is not None
    assert check_rule({"not_contains": "paris"}, out("<think>maybe paris?</think>Lyon")) is None


def test_split_assistant_tokens_separates_tool_blocks():
    tok = ByteTokenizer()
    ids = (tok.encode("Let me compute. ") + [tok.encode_special("<|python_start|>")] + tok.encode("2+3")
           + [tok.encode_special("<|python_end|>"), tok.encode_special("<|output_start|>")] + tok.encode("5")
           + [tok.encode_special("<|output_end|>")] + tok.encode("It is 5.")
           + [tok.encode_special("<|assistant_end|>")] + tok.encode("ignored"))
    o = split_assistant_tokens(ids, tok)
    assert o.text == "Let me compute. It is 5."
    assert o.tool_calls == [("calculator", "2+3")]
    assert o.tool_outputs == ["5"]
    assert "ignored" not in o.raw_text


def test_load_probes_reports_every_bad_line(tmp_path):
    good = {"id": "a", "category": "c", "messages": [{"role": "user", "content": "hi"}], "rules": [{"no_tool": True}]}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "b", "rules": [{"bogus": 1}]}),
             json.dumps({**good, "id": "a"}), json.dumps({**good, "id": "c", "rules": [{"regex": "("}]})]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        load_probes(path)
    msg = str(e.value)
    for lineno in (2, 3, 4, 5):
        assert f"p.jsonl:{lineno}:" in msg
    assert "p.jsonl:1:" not in msg


def test_shipped_probe_file_is_valid():
    from scripts.chat_probe import DEFAULT_PROBES
    probes = load_probes(DEFAULT_PROBES)
    assert {"identity", "chat_format", "arithmetic", "spelling", "markup"} <= {p["category"] for p in probes}


def test_summarize():
    probes = [{"category": "x"}, {"category": "x"}, {"category": "y"}]
    per_cat, total = summarize([(probes[0], []), (probes[1], [("r", "bad")]), (probes[2], [])])
    assert per_cat == {"x": (1, 2), "y": (1, 1)}
    assert total == pytest.approx(2 / 3)


class FakeModel:
    class config:
        sequence_len = 512


class FakeEngine:
    """Answers every prompt with a fixed text, like a model that always says the same thing."""
    answer = "I am nanochat."

    def __init__(self, model, tokenizer, **kw):
        self.tokenizer = tokenizer

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, **kw):
        for t in self.tokenizer.encode(self.answer) + [self.tokenizer.encode_special("<|assistant_end|>")]:
            yield [t], [1]


class FakeChatTokenizer(ByteTokenizer):
    def render_for_completion(self, conversation):
        return [256] + self.encode(conversation["messages"][-2]["content"]) + [259]


@pytest.mark.parametrize("min_pass, expected_exit", [(0.5, 0), (0.95, 1)])
def test_gate_exit_code_and_log(tmp_path, monkeypatch, min_pass, expected_exit):
    from scripts import chat_probe

    tok = FakeChatTokenizer()
    monkeypatch.setattr(chat_probe, "load_engine", lambda args: (FakeModel(), tok, {"step": 7}, FakeEngine(None, tok)))
    probes = tmp_path / "probes.jsonl"
    rows = [{"id": "name", "category": "identity", "messages": [{"role": "user", "content": "name?"}],
             "rules": [{"contains": "nanochat"}]},
            {"id": "math", "category": "arithmetic", "messages": [{"role": "user", "content": "1+1?"}],
             "rules": [{"calls_tool": "any"}]}]
    probes.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    log = tmp_path / "log.jsonl"
    code = chat_probe.main(["--probes", str(probes), "--min-pass", str(min_pass), "--log", str(log),
                            "--device-type", "cpu"])
    assert code == expected_exit
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["total"] == 0.5 and record["per_category"] == {"identity": 1.0, "arithmetic": 0.0}
    assert record["failed_ids"] == ["math"] and record["step"] == 7
