"""The think/tool data generator: every row validates, the same seed gives the same file, tool outputs are what the
tools produce at inference (calculator, LocalSearchProvider + format_results at the Engine's budget), search
answers only say what the search showed, and the think="off" rows are exactly the off prefill."""
import datetime
import random
import re

import pytest

from nanochat.chat_format import THINK_PREFILL, load_conversations_jsonl, split_reasoning, validate_conversation
from nanochat.search_classifier import needs_web_search_contextual
from nanochat.tools import calculator_tool, parse_tool_call, web_search_budget
from nanochat.web_search import DEMO_DOCS_DIR, LocalSearchProvider, format_results
from scripts import gen_think_tool_data as gen


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "rows.jsonl"
    assert gen.main(["--output", str(path), "--rows", "400", "--seed", "3", "--max-seq-len", "512"]) == 0
    return path


def test_every_row_validates_and_every_pattern_appears(rows):
    conversations = load_conversations_jsonl(rows)  # strict: raises on any invalid row
    assert len(conversations) == 400
    assert {c["pattern"] for c in conversations} == set(gen.PATTERN_WEIGHTS)
    assert all(validate_conversation(c) == [] for c in conversations)


def test_rows_agree_with_the_search_classifier(rows):
    """Search rows ask what the Engine's "auto" mode would search; every other row asks what it would not."""
    for conversation in load_conversations_jsonl(rows):
        messages = conversation["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                needs = needs_web_search_contextual(messages[:i])[0]
                assert needs == (conversation["pattern"] in gen.SEARCH_PATTERNS), messages[:i]


def test_same_seed_same_file_other_seed_other_file(rows, tmp_path):
    again, other = tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    gen.main(["--output", str(again), "--rows", "400", "--seed", "3", "--max-seq-len", "512"])
    gen.main(["--output", str(other), "--rows", "400", "--seed", "4", "--max-seq-len", "512"])
    assert again.read_bytes() == rows.read_bytes() != other.read_bytes()


def assistant_turns(conversation):
    return [(conversation["messages"][:i], m["content"]) for i, m in enumerate(conversation["messages"])
            if m["role"] == "assistant"]


def test_tool_outputs_are_what_the_tools_give_at_inference(rows, _isolated_base_dir):
    provider = LocalSearchProvider(DEMO_DOCS_DIR)
    k, max_chars = web_search_budget(512)
    searches = calculations = 0
    for conversation in load_conversations_jsonl(rows):
        for earlier, content in assistant_turns(conversation):
            if isinstance(content, str):
                continue
            for call, output in zip(content, content[1:]):
                if call["type"] != "python":
                    continue
                parsed = parse_tool_call(call["text"])
                assert output["type"] == "python_output" and parsed.error is None
                if parsed.name == "web_search":
                    searches += 1
                    # the query the Engine's "auto" mode would search, and the results as the Engine formats them
                    assert parsed.argument == needs_web_search_contextual(earlier)[1]
                    assert output["text"] == format_results(provider.search(parsed.argument, k), max_chars)
                    answer = split_reasoning(content[-1]["text"])[1] or content[-1]["text"]
                    quoted = answer.split(": ", 1)[-1] if answer.startswith(("Here", "The search")) else answer
                    quoted = quoted.removeprefix("According to the search results, ")
                    assert quoted in " ".join(output["text"].split()), (quoted, output["text"])
                else:
                    calculations += 1
                    assert parsed.name == "calculator" and output["text"] == calculator_tool(parsed.argument)
    assert searches > 50 and calculations > 50


def test_think_off_rows_write_exactly_the_off_prefill(rows):
    firsts = []
    for conversation in load_conversations_jsonl(rows):
        for _, content in assistant_turns(conversation):
            firsts.append(content if isinstance(content, str) else content[0]["text"])
    off = [t for t in firsts if t.startswith(THINK_PREFILL["off"])]
    on = [t for t in firsts if t.startswith(THINK_PREFILL["on"]) and not t.startswith(THINK_PREFILL["off"])]
    assert len(off) + len(on) == len(firsts)  # every assistant turn starts with one of the two prefills
    assert 0.1 < len(off) / len(firsts) < 0.3  # --think-off-frac 0.2


WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


def expected_answer(question):
    """An independent statement of each problem's answer, from the question text alone (None: not checked here)."""
    m = re.search(r"(\w+) days (before|after) a (\w+)day\?|today is (\w+)day, what day (?:of the week will it be in "
                  r"(\w+) days|was it (\w+) days ago)", question)
    if m:
        n = m.group(1) or m.group(5) or m.group(6)
        n = NUMBERS[n] if n in NUMBERS else int(n)
        day = WEEKDAYS.index((m.group(3) or m.group(4)) + "day")
        sign = -1 if (m.group(2) == "before" or m.group(6)) else 1
        return f"It is a {WEEKDAYS[(day + sign * n) % 7]}."
    m = re.fullmatch(r"What date is (\d+) days after (\d+ \w+ \d{4})\?", question)
    if m:
        end = datetime.datetime.strptime(m.group(2), "%d %B %Y") + datetime.timedelta(days=int(m.group(1)))
        return f"It is {end.day} {end:%B %Y}, a {end:%A}."
    m = re.search(r"(\d+)% tip on (?:a )?\$(\d+)", question)
    if m:
        return f"A {m.group(1)}% tip on ${m.group(2)} is ${int(m.group(2)) * int(m.group(1)) / 100:.2f}."
    m = re.search(r"at (\d+)(?::(\d+))? (am|pm) and travels (\d+) miles at (\d+) mph", question)
    if m:
        start = int(m.group(1)) % 12 + (12 if m.group(3) == "pm" else 0)
        arrival = datetime.datetime(2025, 1, 1, start) + datetime.timedelta(hours=int(m.group(4)) / int(m.group(5)))
        return f"It arrives at {arrival:%I}".replace(" 0", " ") + (f":{arrival:%M}" if arrival.minute else "") \
            + f" {arrival:%p}.".lower()
    return None


def test_answers_match_an_independent_computation():
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        for messages in (gen.gen_calculator(rng), gen.gen_dates(rng), gen.gen_travel(rng)):
            expected = expected_answer(messages[0]["content"])
            if expected is None:
                continue
            content = messages[1]["content"]
            answer = content[-1]["text"] if isinstance(content, list) else split_reasoning(content)[1]
            assert answer == expected, messages
            checked += 1
    assert checked > 1500


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert gen.main(["--output", str(tmp_path / "x.jsonl"), "--rows", "0"]) == 2
    assert gen.main(["--output", str(tmp_path / "x.jsonl"), "--docs", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "x.jsonl").exists()
