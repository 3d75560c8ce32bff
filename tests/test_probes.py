import json

import pytest

from tasks.probes import ProbeOutput, check_rule, format_compliance, load_probes, split_assistant_tokens, summarize


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
    ({"thinks": True}, out("<think>\nadd\n</think>\n4"), out("<think>\n</think>\n4")),
    ({"thinks": True}, out("<think>add</think>4"), out("4")),
    ({"thinks": True}, out("<think>add</think>4"), out("<think>add and never stop")),
    ({"calls_tool": "web_search"}, out("", [("web_search", '{"tool": "web_search"}')]), out("", [("calculator", "1")])),
    ({"tool_calls_valid": True}, out("", [("calculator", "1+1")]), out("", [(None, '{"tool": "shel')])),
    ({"max_chars": 5}, out("short"), out("too long")),
])
def test_each_rule_passes_and_fails(rule, passing, failing):
    assert check_rule(rule, passing) is None
    assert check_rule(rule, failing) is not None


def test_an_unclosed_think_is_no_answer():
    # the reasoning ran out of tokens: even a right number inside it is not an answer
    assert out("<think>the answer is 4 but let me").answer == ""
    assert check_rule({"contains": "4"}, out("<think>the answer is 4 but let me")) is not None


def test_tool_calls_are_named_by_what_they_call(byte_tokenizer):
    tok = byte_tokenizer
    s = tok.encode_special

    def block(code):
        return [s("<|python_start|>")] + tok.encode(code) + [s("<|python_end|>")]
    ids = (block('{"tool": "web_search", "arguments": {"query": "Seoul weather"}}') + block("2+3")
           + block('{"tool": "web_search", "arguments": {') + block('{"tool": "shell", "arguments": {}}'))
    calls = split_assistant_tokens(ids, tok).tool_calls
    assert [name for name, _ in calls] == ["web_search", "calculator", None, None]
    # web_search disabled (a run without --with-tools): its call names no tool the Engine would run
    assert split_assistant_tokens(ids, tok, tools=("calculator",)).tool_calls[0][0] is None


def test_format_compliance_counts():
    need = {"messages": [{"role": "user", "content": "What's the weather in Seoul?"}]}
    no_need = {"messages": [{"role": "user", "content": "How do airplanes fly?"}]}
    results = [
        (need, out("<think>look</think>Sunny.", [("web_search", "{...}")]), "on", True),
        (need, out("<think>look and never close", []), "on", True),
        (no_need, out("<think>explain</think>Wings.", [(None, "{bad")]), "on", True),
        (no_need, out("Wings.", []), None, True),
    ]
    c = format_compliance(results)
    assert (c["think_closed"]["passed"], c["think_closed"]["total"]) == (2, 3)
    assert (c["tool_calls_valid"]["passed"], c["tool_calls_valid"]["total"]) == (1, 2)
    assert (c["search_when_needed"]["passed"], c["search_when_needed"]["total"]) == (1, 2)
    assert c["no_search_when_not_needed"]["rate"] == 1.0
    assert format_compliance([(need, out("x"), None, False)])["search_when_needed"] == \
        {"passed": 0, "total": 0, "rate": None}  # without tools, searching is not measured


def test_think_text_is_not_the_answer():
    # a word that only appears inside the reasoning must not satisfy "contains"
    assert check_rule({"contains": "paris"}, out("<think>maybe paris?</think>Lyon")) is not None
    assert check_rule({"not_contains": "paris"}, out("<think>maybe paris?</think>Lyon")) is None


def test_split_assistant_tokens_separates_tool_blocks(byte_tokenizer):
    tok = byte_tokenizer
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
    assert {"identity", "chat_format", "arithmetic", "spelling", "markup", "think_search", "think_calculator",
            "think_direct", "dates", "travel", "followup"} <= {p["category"] for p in probes}
    by_id = {p["id"]: p for p in probes}
    assert by_id["think-search-seoul"]["think"] == "on" and by_id["think-search-seoul"]["with_tools"]
    assert {"calls_tool": "web_search"} in by_id["think-search-seoul"]["rules"]


@pytest.mark.parametrize("extra, message", [({"think": "maybe"}, "think must be"),
                                            ({"with_tools": "yes"}, "with_tools must be"),
                                            ({"tools": ["x"]}, "unknown key")])
def test_optional_probe_keys_are_checked(tmp_path, extra, message):
    probe = {"id": "a", "category": "c", "messages": [{"role": "user", "content": "hi"}],
             "rules": [{"no_tool": True}], **extra}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(probe) + "\n")
    with pytest.raises(ValueError, match=message):
        load_probes(path)


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
    think_default = None

    def __init__(self, model, tokenizer, **kw):
        self.tokenizer = tokenizer
        self.calls = []

    def think_prefill_tokens(self, think):
        return []

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, think=None, search="off", **kw):
        self.calls.append((think, search))
        prefill = {"on": "<think>\nhmm\n</think>\n", "off": "<think>\n</think>\n", None: ""}[think]
        for t in self.tokenizer.encode(prefill + self.answer) + [self.tokenizer.encode_special("<|assistant_end|>")]:
            yield [t], [1]


class FakeChatTokenizer:
    """The byte tokenizer, and the one chat method chat_probe calls: render_for_completion."""

    def __init__(self, byte_tokenizer):
        self.byte_tokenizer = byte_tokenizer

    def __getattr__(self, name):
        return getattr(self.byte_tokenizer, name)

    def render_for_completion(self, conversation):
        return [256] + self.encode(conversation["messages"][-2]["content"]) + [259]


@pytest.mark.parametrize("min_pass, expected_exit", [(0.5, 0), (0.95, 1)])
def test_gate_exit_code_and_log(tmp_path, monkeypatch, byte_tokenizer, min_pass, expected_exit):
    from scripts import chat_probe

    tok = FakeChatTokenizer(byte_tokenizer)
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


def test_think_modes_tool_probes_and_compliance_in_the_log(tmp_path, monkeypatch, byte_tokenizer):
    from scripts import chat_probe

    tok = FakeChatTokenizer(byte_tokenizer)
    engine = FakeEngine(None, tok)
    monkeypatch.setattr(chat_probe, "load_engine", lambda args: (FakeModel(), tok, {"step": 7}, engine))
    rows = [{"id": "own-think", "category": "t", "messages": [{"role": "user", "content": "a?"}], "think": "on",
             "rules": [{"thinks": True}]},
            {"id": "flag-think", "category": "t", "messages": [{"role": "user", "content": "b?"}],
             "rules": [{"thinks": True}]},
            {"id": "needs-search", "category": "s", "with_tools": True,
             "messages": [{"role": "user", "content": "weather in Seoul today?"}], "rules": [{"calls_tool": "web_search"}]}]
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    log = tmp_path / "log.jsonl"
    assert chat_probe.main(["--probes", str(probes), "--log", str(log), "--think", "off", "--min-pass", "0.5"]) == 0
    assert engine.calls == [("on", "off"), ("off", "off")]  # the probe's own mode beats --think; no tools probe skipped
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["per_category"] == {"t": 0.5} and record["skipped_ids"] == ["needs-search"]
    assert record["think"] == "off" and record["format_compliance"]["think_closed"]["rate"] == 1.0
    assert chat_probe.main(["--probes", str(probes), "--log", str(log), "--search", "auto"]) == 2
