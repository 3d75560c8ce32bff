"""
Tasks: slicing, mixtures, prompt formats, answer extraction, procedurally generated spelling data, and the
data plumbing (local files, the hub parquet export served by a local HTTP server, the task_data cache).
"""
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.hub import TaskDataUnavailable


class ListTask(Task):
    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def reference_order(rows, seed=42):
    """What `datasets.Dataset.shuffle(seed=42)` yields: rows in numpy default_rng(seed).permutation order."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


# -----------------------------------------------------------------------------
# Task / TaskMixture / TaskSequence / render_mc

def test_slicing_views():
    items = list(range(10))
    assert [x for x in ListTask(items)] == items
    assert [x for x in ListTask(items, start=2, stop=8, step=3)] == items[2:8:3]
    assert len(ListTask(items, start=1, step=2)) == len(items[1::2])
    assert ListTask(items, start=3)[0] == 3
    assert ListTask(items, start=3)[-1] == 9
    capped = ListTask(items, start=4, stop=50)
    assert len(capped) == 6 and capped[5] == 9
    with pytest.raises(IndexError):
        ListTask(items, stop=4)[4]


def test_task_mixture_is_a_seeded_shuffle_and_oversamples():
    a, b = ListTask([f"a{i}" for i in range(5)]), ListTask([f"b{i}" for i in range(3)])
    mix = TaskMixture([a, b, b])  # b listed twice = oversampled 2x
    pairs = [(t, i) for t, n in enumerate([5, 3, 3]) for i in range(n)]
    random.Random(42).shuffle(pairs)
    tasks = [a, b, b]
    assert [mix[k] for k in range(len(mix))] == [tasks[t][i] for t, i in pairs]
    assert len(mix) == 11
    got = [mix[k] for k in range(len(mix))]
    assert sorted(got) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)] * 2)
    again = TaskMixture([a, b, b])
    assert [again[k] for k in range(len(again))] == got  # same order on every construction/rank
    assert [x for x in TaskMixture([a, b], stop=4)] == [TaskMixture([a, b])[k] for k in range(4)]


def test_task_sequence_keeps_order():
    seq = TaskSequence([ListTask([1, 2]), ListTask([3]), ListTask([4, 5, 6], start=1)])
    assert [x for x in seq] == [1, 2, 3, 5, 6]


def test_render_mc_format():
    got = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert got == "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_annotations_become_tool_parts():
    from tasks.gsm8k import answer_to_parts
    answer = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    assert answer_to_parts(answer) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nShe earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    # an expression containing '=' splits at the last one; a bare annotation has an empty result
    assert answer_to_parts("<<a==b=True>>")[1:3] == [{"type": "python", "text": "a==b"},
                                                    {"type": "python_output", "text": "True"}]
    assert answer_to_parts("x<<5>>")[1:3] == [{"type": "python", "text": "5"}, {"type": "python_output", "text": ""}]


def test_gsm8k_from_local_file_in_reference_order_and_graded(tmp_path):
    from tasks.gsm8k import GSM8K, extract_answer
    rows = [{"question": f"What is {i}*1000?", "answer": f"It is <<{i}*1000={i * 1000}>>{i * 1000}.\n#### {i * 1000:,}"}
            for i in range(12)]
    path = write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    for data_path in [path, str(tmp_path / "gsm8k"), str(tmp_path)]:  # file, split folder, root with gsm8k/
        task = GSM8K("main", "train", data_path=data_path)
        assert len(task) == 12
        expected = reference_order(rows)
        for i in range(12):
            assert task[i]["messages"][0]["content"] == expected[i]["question"]
    conv = task[0]
    ref = extract_answer(conv["messages"][1]["content"][-1]["text"])
    assert "," not in ref
    assert task.evaluate(conv, f"so the answer is #### {int(ref):,}") == 1
    assert task.evaluate(conv, f"#### {int(ref) + 1}") == 0
    assert task.evaluate(conv, "no marker") == 0
    assert task.reward(conv, f"#### {ref}") == 1.0
    with pytest.raises(TaskDataUnavailable, match="split='test'"):
        GSM8K("main", "test", data_path=str(tmp_path / "gsm8k"))


def test_numeric_answers_compare_as_numbers(tmp_path):
    """'#### 1,234' is 1234 and '18.0' is 18 for every task graded by '#### N' (nanochat compares strings)."""
    from tasks.arithmetic import Arithmetic
    from tasks.common import same_number
    from tasks.gsm8k import GSM8K
    from tasks.spellingbee import SpellingBee
    for a, b, equal in [("1,234", "1234", True), ("18.0", "18", True), ("5.", "5", True), ("-3", "-3.00", True),
                        ("12345678901234567890", "12345678901234567891", False), ("18", "18.5", False),
                        (None, "1", False), ("", "", False), ("1.2.3", "1.2.3", False), ("1", None, False)]:
        assert same_number(a, b) is equal, (a, b)
    rows = [{"question": "How many?", "answer": "It is <<1000+234=1234>>1234.\n#### 1,234"},
            {"question": "How much?", "answer": "#### 18"}]
    gsm8k = GSM8K("main", "train", data_path=write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows))
    by_question = {gsm8k[i]["messages"][0]["content"]: gsm8k[i] for i in range(2)}
    for question, right, wrong in [("How many?", ["#### 1234", "#### 1,234.0"], ["#### 1243", "1234"]),
                                   ("How much?", ["#### 18.0", "#### 18."], ["#### 18.01", "#### 180"])]:
        conv = by_question[question]
        assert all(gsm8k.evaluate(conv, r) == 1 for r in right) and all(gsm8k.evaluate(conv, w) == 0 for w in wrong)
    arithmetic = Arithmetic(size=3, split="test")
    conv = arithmetic[0]
    answer = conv["messages"][1]["content"][-1]["text"].rsplit("#### ", 1)[1]
    assert arithmetic.reward(conv, f"#### {answer}.0") == 1.0 and arithmetic.reward(conv, f"#### {answer}1") == 0.0
    words_file = tmp_path / "words.txt"
    words_file.write_text("strawberry\n")
    bee = SpellingBee(size=1, split="train", words_file=str(words_file))
    count = bee[0]["messages"][1]["content"][-1]["text"].rsplit("#### ", 1)[1]
    assert bee.evaluate(bee[0], f"#### {count}.0") == 1 and bee.evaluate(bee[0], f"#### {count}.5") == 0


def test_env_var_overrides(tmp_path, monkeypatch):
    from tasks.gsm8k import GSM8K
    rows = [{"question": "q", "answer": "#### 1"}] * 3
    write_jsonl(tmp_path / "root" / "gsm8k" / "test.jsonl", rows)
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path / "root"))
    assert len(GSM8K("main", "test")) == 3
    monkeypatch.setenv("NANOCHAT_TASK_DATA_GSM8K", write_jsonl(tmp_path / "other.jsonl", rows * 2))
    assert len(GSM8K("main", "test")) == 6  # the per-task variable wins over the root folder


def test_unreachable_hub_without_local_data_names_the_fix():
    from tasks.gsm8k import GSM8K
    with pytest.raises(TaskDataUnavailable) as e:
        GSM8K("main", "test")
    assert "NANOCHAT_TASK_DATA_GSM8K" in str(e.value) and "data_path" in str(e.value)


# -----------------------------------------------------------------------------
# MMLU / ARC / SmolTalk / HumanEval from local files

def test_mmlu_local_parquet_and_auxiliary_train_unwrap(tmp_path):
    from tasks.mmlu import MMLU
    rows = [{"question": f"q{i}", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(6)]
    (tmp_path / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all" / "validation-00000-of-00001.parquet")
    task = MMLU("all", "validation", data_path=str(tmp_path))
    expected = reference_order(rows)
    conv = task[0]
    assert conv["messages"][0]["content"] == render_mc(expected[0]["question"], "ABCD", ["w", "x", "y", "z"])
    assert conv["messages"][1]["content"] == "ABCD"[expected[0]["answer"]]
    assert conv["subject"] == "anatomy" and tuple(conv["letters"]) == ("A", "B", "C", "D")
    assert task.evaluate(conv, conv["messages"][1]["content"]) is True
    wrong = "ABCD"[(expected[0]["answer"] + 1) % 4]
    assert task.evaluate(conv, wrong) is False

    write_jsonl(tmp_path / "auxiliary_train" / "train.jsonl", [{"train": r} for r in rows])
    aux = MMLU("auxiliary_train", "train", data_path=str(tmp_path))
    assert aux[0]["messages"][0]["content"] == conv["messages"][0]["content"]
    write_jsonl(tmp_path / "all" / "auxiliary_train.jsonl", rows)  # newer nanochat: MMLU("all", "auxiliary_train")
    assert MMLU("all", "auxiliary_train", data_path=str(tmp_path))[0] == conv
    with pytest.raises(AssertionError):
        MMLU("auxiliary_train", "test", data_path=str(tmp_path))


def test_arc_picks_the_right_config_file(tmp_path):
    from tasks.arc import ARC
    def rows(tag):
        return [{"id": f"{tag}{i}", "question": f"{tag} question {i}",
                 "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]}, "answerKey": "2"} for i in range(4)]
    write_jsonl(tmp_path / "arc" / "ARC-Easy-validation.jsonl", rows("easy"))
    write_jsonl(tmp_path / "arc" / "ARC-Challenge-validation.jsonl", rows("challenge"))
    task = ARC("ARC-Challenge", "validation", data_path=str(tmp_path))
    conv = task[1]
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: challenge question")
    assert "- q=2\n" in conv["messages"][0]["content"]
    assert list(conv["letters"]) == ["1", "2", "3"]
    assert task.evaluate(conv, "2") and not task.evaluate(conv, "3")


def test_smoltalk_allows_a_leading_system_message(tmp_path):
    from tasks.smoltalk import SmolTalk
    convs = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(convs), tmp_path / "data" / "test-00000-of-00001.parquet")
    task = SmolTalk("test", data_path=str(tmp_path))
    assert sorted(len(task[i]["messages"]) for i in range(2)) == [2, 3]
    assert [task[i] for i in range(2)] == reference_order(convs)


def test_humaneval_program_extraction_and_grading(tmp_path):
    from tasks.humaneval import HumanEval, extract_imports, extract_program
    prompt = "from typing import List\nimport math\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"
    completion = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nand\n```\nother\n```"
    assert extract_program(completion) == "def add(a, b):\n    return a + b"
    assert extract_program("  def f(): pass  ") == "def f(): pass"
    row = {"task_id": "HumanEval/0", "prompt": prompt, "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    task = HumanEval(data_path=write_jsonl(tmp_path / "humaneval" / "HumanEval.jsonl", [row]))
    conv = task[0]
    assert conv["messages"][1]["content"] == prompt + "\n" + row["canonical_solution"]
    assert conv["entry_point"] == "add"
    assert HumanEval(data_path=str(tmp_path))[0] == conv  # folder with HumanEval.jsonl
    assert task.evaluate(conv, completion) is True
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```") is False


# -----------------------------------------------------------------------------
# SpellingBee / SimpleSpelling

WORDS = ["strawberry", "banana", "apple", "mississippi", "kiwi", "zzz"]


def test_spellingbee_is_deterministic_per_index_and_correct(tmp_path):
    from tasks.spellingbee import SpellingBee, extract_answer
    words_file = tmp_path / "words.txt"
    words_file.write_text("\r\n".join(WORDS) + "\r\n")
    train = SpellingBee(size=40, split="train", words_file=str(words_file))
    again = SpellingBee(size=40, split="train", words_file=str(words_file))
    test = SpellingBee(size=40, split="test", words_file=str(words_file))
    assert [train[i] for i in range(40)] == [again[i] for i in range(40)]
    assert [train[i] for i in range(40)] != [test[i] for i in range(40)]
    with pytest.raises(ValueError, match="split must be train or test"):
        SpellingBee(size=40, split="validation", words_file=str(words_file))
    for i in range(40):
        conv = train[i]
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        assert word in WORDS
        count = word.count(letter)
        assert parts[3]["text"] == str(count)
        assert parts[4]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}\n" in parts[0]["text"]
        assert parts[0]["text"].count(" hit! count=") == count
        assert parts[0]["text"].endswith(f"This gives us {count}.")
        assert word in conv["messages"][0]["content"]
        assert train.evaluate(conv, f"... #### {count}") == 1
        assert train.evaluate(conv, f"#### {count + 1}") == 0
        assert extract_answer(parts[4]["text"]) == str(count)
    # the rng recipe: Random(index) picks the word first (test split: 10_000_000 + index)
    assert train[7]["messages"][1]["content"][2]["text"].startswith(f"'{random.Random(7).choice(WORDS)}'")
    assert test[7]["messages"][1]["content"][2]["text"].startswith(f"'{random.Random(10_000_007).choice(WORDS)}'")


def test_simple_spelling(tmp_path, monkeypatch):
    from tasks.spellingbee import SimpleSpelling
    words_file = tmp_path / "words.txt"
    words_file.write_text("\n".join(WORDS) + "\n")
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", str(words_file))
    task = SimpleSpelling(size=5)
    shuffled = list(WORDS)
    random.Random(42).shuffle(shuffled)
    word = random.Random(3).choice(shuffled)
    assert task[3]["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                   {"role": "assistant", "content": f"{word}:{','.join(word)}"}]


def test_spellingbee_offline_corpus_words(_isolated_base_dir, monkeypatch):
    from tasks.spellingbee import SpellingBee
    monkeypatch.setenv("NANOCHAT_WORDS_URL", "http://127.0.0.1:9/words_alpha.txt")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0")
    offline = _isolated_base_dir / "base_data_offline"
    offline.mkdir()
    docs = ["The Quick brown fox, jumped over 12 lazy dogs!", "ok def x_y_z extraordinarily supercalifragilistic"]
    for i, doc in enumerate(docs):
        pq.write_table(pa.table({"text": [doc]}), offline / f"shard_{i:05d}.parquet")
    task = SpellingBee(size=5)
    assert task.words == sorted({"the", "quick", "brown", "fox", "jumped", "over", "lazy", "dogs", "def"})
    assert (_isolated_base_dir / "words_offline.txt").exists()


# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_both_line_shapes(tmp_path):
    from tasks.customjson import CustomJSON
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(conv) + "\n\n" + json.dumps({"messages": conv}) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 2
    assert task[0]["messages"] == conv and task[1]["messages"] == conv
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conv) + "\n" + json.dumps([{"role": "assistant", "content": "x"}]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        CustomJSON(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# The hub parquet export, served locally (conftest's file_server)

def parquet_bytes(rows, tmp_path, name):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


def test_hub_parquet_export_download_and_cache(tmp_path, monkeypatch, _isolated_base_dir, file_server):
    from tasks.mmlu import MMLU
    rows = [{"question": f"q{i}", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(7)]
    hub = file_server({})
    base = "/api/datasets/cais/mmlu/parquet/all/test"
    hub.files[base] = [f"{hub.url}{base}/0.parquet", f"{hub.url}{base}/1.parquet"]
    hub.files[f"{base}/0.parquet"] = parquet_bytes(rows[:4], tmp_path, "a.parquet")
    hub.files[f"{base}/1.parquet"] = parquet_bytes(rows[4:], tmp_path, "b.parquet")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        task = MMLU("all", "test")
    finally:
        hub.close()
    cache = _isolated_base_dir / "task_data" / "cais--mmlu" / "all" / "test"
    assert {"00000.parquet", "00001.parquet", "manifest.json"} <= set(os.listdir(cache))
    assert json.loads((cache / "manifest.json").read_text())["num_rows"] == 7
    expected = reference_order(rows)
    assert [task[i]["messages"][0]["content"].split("\n")[0] for i in range(7)] == \
        [f"Multiple Choice question: {r['question']}" for r in expected]
    # the server is gone: the cache alone serves the data now
    again = MMLU("all", "test")
    assert [again[i] for i in range(7)] == [task[i] for i in range(7)]


def test_hub_falls_back_to_the_refs_convert_parquet_tree(tmp_path, monkeypatch, _isolated_base_dir, file_server):
    from tasks.gsm8k import GSM8K
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    hub = file_server({
        "/api/datasets/openai/gsm8k/tree/refs%2Fconvert%2Fparquet/main/test": [
            {"type": "file", "path": "main/test/0000.parquet"}, {"type": "directory", "path": "main/test/x"}],
        "/datasets/openai/gsm8k/resolve/refs%2Fconvert%2Fparquet/main/test/0000.parquet":
            parquet_bytes(rows, tmp_path, "g.parquet"),
    })
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        task = GSM8K("main", "test")
    finally:
        hub.close()
    assert "/api/datasets/openai/gsm8k/parquet/main/test" in hub.requests  # tried the /parquet API first
    assert [task[i]["messages"][0]["content"] for i in range(5)] == [r["question"] for r in reference_order(rows)]


def test_spellingbee_downloads_the_word_list_once(monkeypatch, _isolated_base_dir, file_server):
    from tasks.spellingbee import SpellingBee, SimpleSpelling
    hub = file_server({"/words_alpha.txt": "\r\n".join(WORDS).encode() + b"\r\n"})
    monkeypatch.setenv("NANOCHAT_WORDS_URL", f"{hub.url}/words_alpha.txt")
    try:
        bee = SpellingBee(size=3)
        simple = SimpleSpelling(size=3)
    finally:
        hub.close()
    assert (_isolated_base_dir / "words_alpha.txt").exists()
    assert bee.words == WORDS and sorted(simple.words) == sorted(WORDS)
    assert hub.requests == ["/words_alpha.txt"]
