"""The SFT-pool filter: each rule drops its case and keeps its near miss, only assistant text counts, and the
script keeps rows byte for byte, tags dropped rows, reports per rule (last line JSON), honours --disable and
--extra-rules, and fails on malformed rows with path:line without writing anything."""
import json
import os
import subprocess
import sys

import pytest

from nanochat.sft_filter import RULE_NAMES, build_rules, first_matching_rule, load_extra_rules
from scripts import filter_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = "This sentence is here so that the answer is comfortably long enough."  # > 40 chars, matches nothing


def chat(answer, question="Tell me something."):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def reason(answer, rules=None):
    return first_matching_rule(chat(answer), build_rules() if rules is None else rules)


# (rule, text that must be dropped by it, near miss that must be kept)
CASES = [
    ("html_tags", f"{FILLER} It is <b>important</b>.", f"{FILLER} Line one<br>line two, a <ul> list and <img>."),
    ("html_tags", f"{FILLER} Closing only</EM> here.", f"{FILLER} Compare a<b and b>c in math."),
    ("html_tags", f'{FILLER} <strong class="x">x</strong>', f"{FILLER} <bold> is not an HTML tag."),
    ("stock_labels", f"Answer: {FILLER}", f"{FILLER} Answer: in the middle is fine."),
    ("stock_labels", f"  final answer: {FILLER}", f"Answers: {FILLER}"),
    ("stock_labels", f"Q: {FILLER}", f"Quite: {FILLER}"),
    ("stock_labels", f"<think>hmm</think>\nResponse: {FILLER}", f"<think>Response: hmm</think> {FILLER}"),
    ("placeholder_image", f"{FILLER} ![diagram of the cell]", f"{FILLER} ![diagram](https://x.org/cell.png)"),
    ("placeholder_image", f"{FILLER} ![chart]() here", f"{FILLER} [a link] and ! [spaced]"),
    ("emoji_spam", f"{FILLER} 🎉🎉🎉", f"{FILLER} 🎉🎉 and later 🎉"),
    ("emoji_spam", f"{FILLER} 🔥 🔥 🔥", f"{FILLER} 👍🏽👍🏽 (skin tones are not emoji of their own)"),
    ("emoji_spam", f"{FILLER} 🇫🇷🇩🇪🇮🇹", f"{FILLER} 👨‍👩‍👧👍 (a ZWJ family is one emoji)"),
    ("ai_hedge", f"As an AI Language Model, I think so. {FILLER}", f"As an AI, I think so. {FILLER}"),
    ("refusal", f"I CANNOT provide that. {FILLER}", f"I cannot promise that. {FILLER}"),
    ("repeated_lines", f"{FILLER}\nsame\nsame\nsame\nend", f"{FILLER}\nsame\nsame\nend"),
    ("repeated_lines", f"{FILLER}\nsame\nsame\nsame", f"{FILLER}\nsame\nsame\nsameness\n\n\n\n"),
    ("too_short", "x" * 40, "x" * 41),
    ("too_short", "   " + "y" * 40 + "\n\n", "Paris is the capital and largest city of France."),
]


@pytest.mark.parametrize("rule,dropped,kept", CASES)
def test_rule_drops_its_case_and_keeps_its_near_miss(rule, dropped, kept):
    assert reason(dropped) == rule
    assert reason(kept) is None


def test_rules_are_checked_in_the_documented_order():
    assert RULE_NAMES == ["html_tags", "stock_labels", "placeholder_image", "emoji_spam", "ai_hedge", "refusal",
                          "repeated_lines", "too_short"]
    # matches every rule: the first one names the drop, and switching it off reveals the next
    everything = "Answer: <b>x</b> ![img] 🎉🎉🎉 as an AI language model I cannot provide\na\na\na"
    rules_off = []
    for name in RULE_NAMES[:-1]:
        assert reason(everything, build_rules(disable=rules_off)) == name
        rules_off.append(name)


def test_user_and_system_text_never_drop_a_row():
    bad = "Answer: <b>hi</b> ![img] 🎉🎉🎉 as an AI language model, I cannot provide\nx\nx\nx"
    messages = [{"role": "system", "content": bad}, {"role": "user", "content": bad},
                {"role": "assistant", "content": FILLER}]
    assert first_matching_rule(messages, build_rules()) is None


def test_assistant_parts_text_is_checked_code_and_tool_output_are_not():
    def parts(text, code):
        return [{"role": "user", "content": "compute"},
                {"role": "assistant", "content": [{"type": "text", "text": text}, {"type": "python", "text": code},
                                                  {"type": "python_output", "text": "<b>1</b> 🎉🎉🎉"}]}]
    assert first_matching_rule(parts(FILLER, "print('<b>')"), build_rules()) is None
    assert first_matching_rule(parts(f"{FILLER} <i>really</i>", "1+1"), build_rules()) == "html_tags"
    # text parts are joined by newlines, so "Answer:" at the start of the first text part is a label
    assert first_matching_rule(parts(f"Answer: {FILLER}", "1+1"), build_rules()) == "stock_labels"


def test_too_short_counts_all_assistant_turns_and_any_turn_can_match_a_pattern():
    multi = chat(FILLER) + [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome!"}]
    assert first_matching_rule(multi, build_rules()) is None
    multi[-1]["content"] = "You're <em>welcome</em>!"
    assert first_matching_rule(multi, build_rules()) == "html_tags"
    short_turns = chat("Yes.") + [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes!"}]
    assert first_matching_rule(short_turns, build_rules()) == "too_short"


def test_repeated_lines_is_linear_on_long_lines():
    # a backtracking `(.*\S.*)` group would take minutes here; this only checks it returns at all
    long_line = ("word " * 20000 + "\n") * 2 + "tail"
    assert reason(long_line) is None


def test_extra_rules_file_and_errors(tmp_path):
    path = tmp_path / "rules.tsv"
    path.write_text("# my rules\n\ncopyright\t(?i)all rights reserved\nsorry\tI'm sorry\n")
    extra = load_extra_rules(str(path))
    assert [name for name, _ in extra] == ["copyright", "sorry"]
    rules = build_rules(extra_rules=extra)
    assert reason(f"{FILLER} ALL RIGHTS RESERVED.", rules) == "copyright"
    assert reason(f"{FILLER} <b>All rights reserved</b>", rules) == "html_tags"  # built-ins come first
    assert reason(f"{FILLER} All rights are reserved.", rules) is None
    for text, message in [("no tab here\n", r"rules.tsv:1: expected `name<TAB>pattern`"),
                          ("ok\tfine\nbad\t(unclosed\n", r"rules.tsv:2: rule 'bad': bad pattern"),
                          ("html_tags\tx\n", r"rules.tsv:1: rule name 'html_tags' is already taken")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_extra_rules(str(path))
    with pytest.raises(ValueError, match="unknown rule.*nope"):
        build_rules(disable=["nope"])

# -----------------------------------------------------------------------------
# the script


def write_lines(path, lines):
    path.write_bytes(b"".join(line.encode() + b"\n" for line in lines))
    return str(path)


def run(argv, capsys):
    rc = filter_sft.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_script_keeps_rows_byte_for_byte_and_tags_dropped_rows(tmp_path, capsys):
    good_dict = json.dumps({"messages": chat(FILLER), "source": "a"}, ensure_ascii=False, indent=None)
    good_odd_spacing = '[ {"role":"user","content":"é"} ,{"role":"assistant", "content":"' + FILLER + '"} ]'
    html = json.dumps({"id": 7, "messages": chat(f"{FILLER} <b>x</b>")})
    short_list = json.dumps(chat("Too short."))
    first = write_lines(tmp_path / "a.jsonl", [good_dict, html, ""])
    second = tmp_path / "b.jsonl"
    second.write_bytes((short_list + "\n" + good_odd_spacing).encode())  # no newline after the last line
    kept, rejected = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl"
    rc, out, _ = run([first, str(second), "--output", str(kept), "--rejected", str(rejected)], capsys)
    assert rc == 0
    assert kept.read_bytes() == (good_dict + "\n" + good_odd_spacing + "\n").encode()
    dropped = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert dropped == [{"id": 7, "messages": chat(f"{FILLER} <b>x</b>"), "filter_reason": "html_tags"},
                       {"messages": chat("Too short."), "filter_reason": "too_short"}]
    assert rejected.read_text().splitlines()[0].startswith(html[:-1])  # the original bytes, a key appended

    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["rows"] == 4 and stats["kept"] == 2 and stats["dropped"] == 2
    assert list(stats["rules"]) == RULE_NAMES
    assert stats["rules"]["html_tags"] == {"count": 1, "percent": 25.0}
    assert stats["rules"]["too_short"] == {"count": 1, "percent": 25.0}
    assert sum(entry["count"] for entry in stats["rules"].values()) == stats["dropped"]
    assert "html_tags" in out and "25.00" in out  # the human table precedes the JSON line
    section = open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "report", "sft-data-filter.md")).read()
    assert "| html_tags | 1 | 25.00 |" in section and "- Kept: 2" in section


def test_refiltering_a_rejected_file_replaces_the_reason(tmp_path, capsys):
    row = json.dumps({"messages": chat(f"{FILLER} 🎉🎉🎉"), "filter_reason": "stale"})
    src = write_lines(tmp_path / "in.jsonl", [row])
    rejected = tmp_path / "r.jsonl"
    rc, _, _ = run([src, "--output", str(tmp_path / "k.jsonl"), "--rejected", str(rejected)], capsys)
    assert rc == 0
    assert json.loads(rejected.read_text())["filter_reason"] == "emoji_spam"
    assert rejected.read_text().count("filter_reason") == 1


def test_disable_and_extra_rules_flags(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(chat("Short but fine.")),
                                               json.dumps(chat(f"{FILLER} Lorem ipsum."))])
    rules = tmp_path / "rules.tsv"
    rules.write_text("lorem\tLorem ipsum\n")
    kept = tmp_path / "kept.jsonl"
    rc, out, _ = run([src, "--output", str(kept), "--disable", "too_short", "--extra-rules", str(rules)], capsys)
    assert rc == 0
    stats = json.loads(out.strip().splitlines()[-1])
    assert "too_short" not in stats["rules"] and stats["disabled"] == ["too_short"]
    assert stats["rules"]["lorem"]["count"] == 1 and stats["kept"] == 1
    assert json.loads(kept.read_text()) == chat("Short but fine.")

    rc, _, err = run([src, "--output", str(kept), "--disable", "too_shrt"], capsys)
    assert rc == 2 and "unknown rule(s) to disable: too_shrt" in err and "Traceback" not in err


def test_malformed_rows_fail_with_path_and_line_and_write_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    src = write_lines(work / "in.jsonl", [json.dumps(chat(FILLER)), "{not json", "",
                                               json.dumps([{"role": "user", "content": "no answer"}]),
                                               json.dumps({"messages": chat(["a list?"])})])
    rc, out, err = run([src, "--output", str(work / "kept.jsonl"), "--rejected", str(work / "r.jsonl")], capsys)
    assert rc == 2
    assert f"{src}:2: invalid JSON" in err
    assert f"{src}:4: last message is from 'user'" in err
    assert f"{src}:5: message 1 (assistant): part 0" in err
    assert os.listdir(work) == ["in.jsonl"]  # no output, no temp file left behind


def test_cli_user_errors_exit_2_in_one_line(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(chat(FILLER))])
    for argv in ([str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "k.jsonl")],
                 [src, "--output", src]):
        result = subprocess.run([sys.executable, "-m", "scripts.filter_sft", *argv], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("filter_sft: error: ")
    assert json.loads(open(src).read()) == chat(FILLER)  # the input was not overwritten
