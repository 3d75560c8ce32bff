"""
CORE scoring against hand computation: a character-level tokenizer and a bigram "model" whose logits we
control, so every expected cross-entropy / greedy prediction is recomputed here with plain math. The fast path
against the plain one on a tiny random GPT; CORE of a fixed model identical on 1 and 2 gloo ranks.
"""
import io
import math
import os
import random
import socket
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import core_eval as ce
from nanochat import download
from nanochat.gpt import GPT

# -----------------------------------------------------------------------------
# Toy tokenizer and model

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
BOS = 0
VOCAB = len(CHARS) + 1


class CharTokenizer:
    """One token per character; id 0 is BOS."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        ids = [CHARS.index(c) + 1 for c in text]
        return ([prepend] if prepend is not None else []) + ids


class BigramModel:
    """logits[b, t] = table[ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, table, max_seq_len=None):
        self.table = table
        self.calls = []
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len

    def __call__(self, ids):
        self.calls.append(ids.clone())
        return self.table[ids]


def random_table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=g) * 2


def hand_mean_ce(table, ids, start, end):
    """Mean over positions j in [start, end) of -log softmax(table[ids[j-1]])[ids[j]], in plain Python."""
    total = 0.0
    for j in range(start, end):
        row = [float(x) for x in table[ids[j - 1]]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(x - m) for x in row))
        total += log_z - row[ids[j]]
    return total / (end - start)


TOK = CharTokenizer()


def ids_of(text):
    return TOK.encode(text, prepend=BOS)


# -----------------------------------------------------------------------------
# Prompt rendering (strings compared exactly)

def test_render_mc_with_fewshot():
    fewshot = [{"query": "Q: 1+1?", "choices": ["1", "2"], "gold": 1},
               {"query": "Q: sky?", "choices": ["blue", "red"], "gold": 0}]
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    prompts = ce.render_prompts_mc(item, "\nAnswer: ", fewshot)
    prefix = "Q: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\n"
    assert prompts == [prefix + "Q: 2+2?\nAnswer: 4", prefix + "Q: 2+2?\nAnswer: 5"]
    assert ce.render_prompts_mc(item, " ") == ["Q: 2+2? 4", "Q: 2+2? 5"]


def test_render_schema_with_fewshot():
    fewshot = [{"context_options": ["Ann sat.", "Bob sat."], "continuation": "He smiled.", "gold": 1}]
    item = {"context_options": ["The cup fell.", "The box fell."], "continuation": "It broke.", "gold": 0}
    prompts = ce.render_prompts_schema(item, " ", fewshot)
    assert prompts == ["Bob sat. He smiled.\n\nThe cup fell. It broke.",
                       "Bob sat. He smiled.\n\nThe box fell. It broke."]


def test_render_lm_trims_context_and_strips_prompt_without():
    fewshot = [{"context": "  Capital of France:  ", "continuation": "Paris"}]
    item = {"context": "Capital of Italy: \n", "continuation": "Rome"}
    without, with_ = ce.render_prompts_lm(item, " ", fewshot)
    assert with_ == "Capital of France: Paris\n\nCapital of Italy: Rome"
    assert without == "Capital of France: Paris\n\nCapital of Italy:"  # trailing delimiter stripped
    without, with_ = ce.render_prompts_lm(item, "\nAnswer: ")
    assert (without, with_) == ("Capital of Italy:\nAnswer:", "Capital of Italy:\nAnswer: Rome")


def test_fewshot_sampling_matches_sampling_from_the_explicit_list():
    for n, k in [(5, 3), (40, 10), (3000, 10), (12, 0)]:
        data = list(range(n))
        for idx in [0, 1, n // 2, n - 1]:
            rng = random.Random(1234 + idx)
            expected = [data[i] for i in rng.sample([i for i in range(n) if i != idx], k)] if k else []
            got = ce.sample_fewshot(data, idx, k)
            assert got == expected
            assert idx not in got


def test_find_common_length():
    assert ce.find_common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert ce.find_common_length([[1, 2], [1, 2, 3]], "left") == 2
    assert ce.find_common_length([[9, 2, 3], [1, 2, 3], [3]], "right") == 1
    assert ce.find_common_length([[5, 2, 3], [7, 4, 2, 3]], "right") == 2
    assert ce.find_common_length([[1], [2]], "left") == 0


# -----------------------------------------------------------------------------
# Scoring, one task type at a time

def test_multiple_choice_scores_only_tokens_after_the_common_prefix():
    table = random_table(1)
    model = BigramModel(table)
    data = [{"query": "pet:", "choices": [" cat", " car", " dog!"], "gold": 2}]
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
    is_correct, losses = ce.score_example(0, model, TOK, data, "cpu", meta)
    # choices diverge after " ca" / " d": the common token prefix is BOS + "pet: " → 6 tokens
    start = 6
    expected = [hand_mean_ce(table, ids_of("pet:" + c), start, len(ids_of("pet:" + c))) for c in data[0]["choices"]]
    assert losses == pytest.approx(expected, abs=1e-5)
    assert is_correct == (expected.index(min(expected)) == 2)
    # one forward for the whole example: all choices, right-padded with BOS
    assert len(model.calls) == 1
    batch = model.calls[0]
    assert batch.shape == (3, len(ids_of("pet: dog!")))
    assert batch[0].tolist() == ids_of("pet: cat") + [BOS]


def test_multiple_choice_picks_lowest_mean_loss():
    table = torch.zeros(VOCAB, VOCAB)
    b = CHARS.index("b") + 1
    colon = CHARS.index(":") + 1
    table[colon, b] = 5.0  # after ':' the model strongly expects 'b'
    data = [{"query": "x:", "choices": ["a", "b"], "gold": 1}, {"query": "y:", "choices": ["b", "a"], "gold": 1}]
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
    model = BigramModel(table)
    assert ce.evaluate_example(0, model, TOK, data, "cpu", meta) is True
    assert ce.evaluate_example(1, model, TOK, data, "cpu", meta) is False


def test_schema_scores_the_common_suffix():
    table = random_table(2)
    model = BigramModel(table)
    data = [{"context_options": ["The cat", "A big dog"], "continuation": "ran off.", "gold": 0}]
    meta = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
    is_correct, losses = ce.score_example(0, model, TOK, data, "cpu", meta)
    expected = []
    for ctx in data[0]["context_options"]:
        ids = ids_of(ctx + " ran off.")
        suffix = len(" ran off.")  # "The cat" / "A big dog" differ in their last char, the suffix is the rest
        expected.append(hand_mean_ce(table, ids, len(ids) - suffix, len(ids)))
    assert losses == pytest.approx(expected, abs=1e-5)
    assert is_correct == (expected.index(min(expected)) == 0)


def _chain_table(text):
    """A bigram table whose greedy continuation from each char of `text` is the next char of `text`."""
    table = torch.zeros(VOCAB, VOCAB)
    ids = ids_of(text)
    for cur, nxt in zip(ids[:-1], ids[1:]):
        table[cur, nxt] = 10.0
    return table


def test_language_modeling_is_greedy_exact_match():
    table = _chain_table("ab: cd")
    model = BigramModel(table)
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    data = [{"context": "ab:", "continuation": "cd"}, {"context": "ab:", "continuation": "ce"}]
    assert ce.evaluate_example(0, model, TOK, data, "cpu", meta) is True
    assert ce.evaluate_example(1, model, TOK, data, "cpu", meta) is False  # 'c' is predicted, 'e' is not
    # only the prompt *with* the continuation is forwarded
    assert [c.shape for c in model.calls] == [(1, len(ids_of("ab: cd")))] * 2


def test_fewshot_examples_reach_the_model():
    table = random_table(3)
    model = BigramModel(table)
    data = [{"context": f"w{i}", "continuation": f"c{i}"} for i in range(6)]
    meta = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": "="}
    ce.evaluate_example(4, model, TOK, data, "cpu", meta)
    shots = [data[i] for i in random.Random(1234 + 4).sample([0, 1, 2, 3, 5], 2)]
    text = "".join(f"{s['context']}={s['continuation']}\n\n" for s in shots) + "w4=c4"
    assert model.calls[0][0].tolist() == ids_of(text)


# -----------------------------------------------------------------------------
# Truncation

def test_left_truncation_to_model_max_seq_len():
    table = random_table(4)
    model = BigramModel(table, max_seq_len=8)
    data = [{"query": "long question:", "choices": [" yes", " no"], "gold": 0}]
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
    is_correct, losses = ce.score_example(0, model, TOK, data, "cpu", meta)
    full = [ids_of("long question: yes"), ids_of("long question: no")]
    start = len(ids_of("long question: "))
    expected = []
    for ids in full:
        crop = max(len(ids) - 8, 0)
        kept = ids[crop:]
        expected.append(hand_mean_ce(table, kept, start - crop, len(kept)))
    batch = model.calls[0]
    assert batch.shape == (2, 8)
    assert batch[0].tolist() == full[0][-8:]
    assert batch[1].tolist() == full[1][-8:]  # each row cut on its own, both to 8
    assert losses == pytest.approx(expected, abs=1e-5)


def test_no_truncation_without_max_seq_len():
    model = BigramModel(random_table(5))
    data = [{"context": "x" * 50, "continuation": "yz"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    ce.evaluate_example(0, model, TOK, data, "cpu", meta)
    assert model.calls[0].shape == (1, len(ids_of("x" * 50 + " yz")))


def test_prompt_that_cannot_fit_raises_a_clear_error():
    model = BigramModel(random_table(6), max_seq_len=4)
    data = [{"context": "ctx", "continuation": "a very long continuation"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    with pytest.raises(ValueError, match="cannot fit"):
        ce.evaluate_example(0, model, TOK, data, "cpu", meta)


# -----------------------------------------------------------------------------
# evaluate_task, distributed striding, centered accuracy, evaluate_core

def _toy_lm_data():
    # greedy chain "ab: cd": items with continuation "cd" are right, the others wrong
    return [{"context": "ab:", "continuation": c} for c in ["cd", "ce", "cd", "cx", "cd"]]


def test_evaluate_task_accuracy():
    model = BigramModel(_chain_table("ab: cd"))
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    assert ce.evaluate_task(model, TOK, _toy_lm_data(), "cpu", meta) == pytest.approx(3 / 5)


def test_evaluate_task_strides_over_ranks_and_all_reduces(monkeypatch):
    seen, reduced = [], []
    real = ce.evaluate_example

    def spy(idx, *args, **kwargs):
        seen.append(idx)
        return real(idx, *args, **kwargs)

    def fake_all_reduce(tensor, op=None):
        reduced.append(tensor.clone())
        tensor += torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # what rank 0 found (items 0, 2, 4)

    monkeypatch.setattr(ce, "evaluate_example", spy)
    monkeypatch.setattr(ce.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ce.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(ce.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ce.dist, "barrier", lambda: None)
    monkeypatch.setattr(ce.dist, "all_reduce", fake_all_reduce)
    model = BigramModel(_chain_table("ab: cd"))
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    acc = ce.evaluate_task(model, TOK, _toy_lm_data(), "cpu", meta)
    assert seen == [1, 3]  # rank 1 of 2 takes every other item
    assert reduced[0].tolist() == [0.0] * 5  # items 1 and 3 are both wrong
    assert acc == pytest.approx(3 / 5)


def test_centered_accuracy():
    assert ce.centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert ce.centered_accuracy(1.0, 25.0) == pytest.approx(1.0)
    assert ce.centered_accuracy(0.5, 25.0) == pytest.approx((0.5 - 0.25) / 0.75)
    assert ce.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)


def test_evaluate_core_on_a_toy_bundle(tmp_path, write_eval_bundle):
    datasets = write_eval_bundle(tmp_path / "bundle")
    model = BigramModel(random_table(7))
    out = ce.evaluate_core(model, TOK, "cpu", bundle_dir=str(tmp_path / "bundle"))
    assert list(out["results"]) == ["toy_mc", "toy_schema", "toy_lm"]
    metas = {"toy_mc": ("multiple_choice", 2, "\nAnswer: "), "toy_schema": ("schema", 0, " "),
             "toy_lm": ("language_modeling", 1, " ")}
    baselines = {"toy_mc": 50.0, "toy_schema": 50.0, "toy_lm": 0.0}
    for label, rows in datasets.items():
        data = list(rows)
        random.Random(1337).shuffle(data)  # the reference's shuffle before any max_per_task cap
        task_type, shots, delim = metas[label]
        meta = {"task_type": task_type, "num_fewshot": shots, "continuation_delimiter": delim}
        acc = sum(ce.evaluate_example(i, model, TOK, data, "cpu", meta) for i in range(len(data))) / len(data)
        assert out["results"][label] == pytest.approx(acc)
        assert out["centered_results"][label] == pytest.approx((acc - baselines[label] / 100) / (1 - baselines[label] / 100))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)

    # a subset of tasks, and max_per_task = the first items after the Random(1337) shuffle
    sub = ce.evaluate_core(model, TOK, "cpu", max_per_task=3, bundle_dir=str(tmp_path / "bundle"), tasks=["toy_mc"])
    assert list(sub["results"]) == ["toy_mc"]
    data = list(datasets["toy_mc"])
    random.Random(1337).shuffle(data)
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": "\nAnswer: "}
    acc = sum(ce.evaluate_example(i, model, TOK, data[:3], "cpu", meta) for i in range(3)) / 3
    assert sub["results"]["toy_mc"] == pytest.approx(acc)
    with pytest.raises(ValueError, match="unknown CORE task"):
        ce.evaluate_core(model, TOK, "cpu", bundle_dir=str(tmp_path / "bundle"), tasks=["nope"])


def test_existing_bundle_in_base_dir_is_used_without_download(tmp_path, monkeypatch, _isolated_base_dir,
                                                             write_eval_bundle):
    write_eval_bundle(_isolated_base_dir / "eval_bundle")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/never.zip")
    assert ce.ensure_eval_bundle() == str(_isolated_base_dir / "eval_bundle")


def test_eval_bundle_download_and_unzip(tmp_path, monkeypatch, _isolated_base_dir, file_server, write_eval_bundle):
    write_eval_bundle(tmp_path / "src" / "eval_bundle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the real zip holds a top-level eval_bundle/ folder
        for path in sorted((tmp_path / "src").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    server = file_server({"/eval_bundle.zip": buf.getvalue()})
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/eval_bundle.zip")
    try:
        bundle = ce.ensure_eval_bundle()
    finally:
        server.close()
    assert bundle == str(_isolated_base_dir / "eval_bundle")
    assert (_isolated_base_dir / "eval_bundle" / "eval_data" / "sub" / "schema.jsonl").exists()
    out = ce.evaluate_core(BigramModel(random_table(8)), TOK, "cpu", tasks=["toy_lm"])
    assert set(out["results"]) == {"toy_lm"}


def test_eval_bundle_unreachable_says_what_to_do(monkeypatch):

    def refuse(*args, **kwargs):
        raise download.DownloadError("connection refused")

    monkeypatch.setattr(ce, "download_file", refuse)
    with pytest.raises(RuntimeError, match="NANOCHAT_EVAL_BUNDLE_URL"):
        ce.ensure_eval_bundle()


def test_too_few_items_for_the_fewshot_count_is_a_clear_error():
    data = [{"context": f"w{i}", "continuation": "c"} for i in range(3)]
    meta = {"task_type": "language_modeling", "num_fewshot": 5, "continuation_delimiter": " "}
    with pytest.raises(ValueError, match="max-per-task"):
        ce.evaluate_example(0, BigramModel(random_table(9)), TOK, data, "cpu", meta)


# -----------------------------------------------------------------------------
# The fast path (logits only where scored, shared option prefix through a KV cache) against the plain
# full-logits path, on a tiny random GPT: same per-option mean losses, same decisions
# (build_random_gpt's model: GQA and a short sliding window on alternate layers, so the KV-cache chunk attends
# through a window mask; every parameter random, as init_weights zeroes output projections, which hides bugs)


@pytest.fixture
def path_spy(monkeypatch):
    """Counts how score_example computed its logits: shared-prefix KV path, and the logits_from it asked for.
    Every shared prefix is used, however short (the real threshold is a speed trade-off, not a correctness one)."""
    monkeypatch.setattr(ce, "MIN_SHARED_TOKENS", 1)
    counts = {"shared": 0, "logits_from": []}
    real_shared, real_forward = ce._shared_prefix_logits, GPT.forward

    def shared(*args, **kwargs):
        counts["shared"] += 1
        return real_shared(*args, **kwargs)

    def forward(self, idx, *args, logits_from=0, **kwargs):
        counts["logits_from"].append(logits_from)
        return real_forward(self, idx, *args, logits_from=logits_from, **kwargs)

    monkeypatch.setattr(ce, "_shared_prefix_logits", shared)
    monkeypatch.setattr(GPT, "forward", forward)
    return counts


def assert_fast_equals_plain(model, data, meta):
    """Every item: the same decision, and the same per-option mean losses (NaN where a span is empty)."""
    decisions = []
    for idx in range(len(data)):
        fast_ok, fast_losses = ce.score_example(idx, model, TOK, data, "cpu", meta)
        plain_ok, plain_losses = ce.score_example_plain(idx, model, TOK, data, "cpu", meta)
        assert fast_ok == plain_ok, f"item {idx}"
        if meta["task_type"] == "language_modeling":
            assert fast_losses is None and plain_losses is None
        else:
            assert fast_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-5, nan_ok=True), f"item {idx}"
        decisions.append(plain_ok)
    return decisions


MC_DATA = [{"query": f"Question {i}: which word fits {'xyz'[i % 3]}?", "choices": choices, "gold": i % len(choices)}
           for i, choices in enumerate([[" cat", " dog", " bird!"], [" red", " green"], [" up", " down", " left", " no"],
                                        [" a", " b"], [" one", " two", " three"], [" cat", " cats"]])]
# the last item's first choice is a token prefix of the second: its span is empty, its loss NaN (as in nanochat)


def test_fast_path_matches_plain_multiple_choice(path_spy, build_random_gpt):
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": "\nAnswer:"}
    decisions = assert_fast_equals_plain(build_random_gpt(1, vocab_size=VOCAB), MC_DATA, meta)
    assert path_spy["shared"] > 0  # the few-shot examples + question went through the model once per item
    assert len(set(decisions)) == 2  # the data exercises both outcomes


SCHEMA_DATA = [{"context_options": [f"Sam{i} put the cup on the table", f"Sam{i} put the box in the bag"],
                "continuation": f"because it was {'light' if i % 2 else 'heavy'}.", "gold": i % 2} for i in range(6)]


def test_fast_path_matches_plain_schema(path_spy, build_random_gpt):
    meta = {"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "}
    model = build_random_gpt(2, vocab_size=VOCAB)
    decisions = assert_fast_equals_plain(model, SCHEMA_DATA, meta)
    assert path_spy["shared"] > 0  # the few-shot example and "Sam<i> put the " are shared
    assert len(set(decisions)) == 2
    # the contexts differ in length, so one row's span starts later: its head is not scored, and no logits
    # are computed for it (the chunk after the shared prefix starts before the earlier span)
    path_spy["logits_from"].clear()
    ce.score_example(0, model, TOK, SCHEMA_DATA, "cpu", meta)
    assert path_spy["logits_from"][-1] > 0


def _greedy_text(model, prompt, n):
    """The model's greedy continuation of prompt (n characters), or None if it would emit BOS."""
    ids = TOK.encode(prompt, prepend=BOS)
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(torch.tensor([ids])).argmax(-1)[0, -1])
            if next_id == BOS:
                return None
            ids.append(next_id)
    return "".join(CHARS[i - 1] for i in ids[-n:])


def test_fast_path_matches_plain_language_modeling(path_spy, build_random_gpt):
    model = build_random_gpt(3, vocab_size=VOCAB)
    # empty delimiter: the whole continuation is then the model's to predict after the (trimmed) context
    meta = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": ""}
    data = [{"context": f"Item {i} says ", "continuation": f"v{i}"} for i in range(6)]
    # make some items right: their continuation is the model's own greedy one given their few-shot prompt
    # (kept only while every item made so far stays right: an item is also other items' few-shot example)
    made = []
    for idx in range(len(data)):
        data[idx]["continuation"] = ""
        prompt = ce.render_prompts_lm(data[idx], "", ce.sample_fewshot(data, idx, 2))[1]
        text = _greedy_text(model, prompt, 3)
        data[idx]["continuation"] = text if text is not None else f"v{idx}"
        if all(ce.score_example_plain(i, model, TOK, data, "cpu", meta)[0] for i in made + [idx]):
            made.append(idx)
        else:
            data[idx]["continuation"] = f"v{idx}"
    assert len(made) >= 2, "test setup: expected greedy continuations without BOS"
    decisions = assert_fast_equals_plain(model, data, meta)
    assert any(decisions) and not all(decisions)
    # one of them gets a wrong last character: greedy on the first tokens, not the last
    last = made[-1]
    data[last]["continuation"] = data[last]["continuation"][:-1] + ("x" if data[last]["continuation"][-1] != "x" else "y")
    assert_fast_equals_plain(model, data, meta)
    path_spy["logits_from"].clear()
    for idx in range(len(data)):
        ce.score_example(idx, model, TOK, data, "cpu", meta)
    assert min(path_spy["logits_from"]) > 0  # LM: the lm_head never ran over the context


def test_fast_path_matches_plain_when_truncated(path_spy, build_random_gpt):
    """A model that declares max_seq_len gets each row cut from the left on its own (nanochat's rule): rows of
    equal length still share a (shorter) prefix, rows of different lengths share less or nothing."""
    model = build_random_gpt(4, vocab_size=VOCAB)
    model.max_seq_len = 40
    mc = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": "\nAnswer:"}
    tokens, _, _ = ce.prepare_example(0, TOK, MC_DATA, mc)
    assert len(tokens[0]) > 40  # really truncated
    assert_fast_equals_plain(model, MC_DATA, mc)
    assert path_spy["shared"] > 0
    schema = {"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "}
    assert_fast_equals_plain(model, SCHEMA_DATA, schema)
    lm = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": " "}
    assert_fast_equals_plain(model, [{"context": f"Item {i} says ", "continuation": f"v{i}"} for i in range(5)], lm)


def test_fast_and_plain_core_agree_on_a_toy_bundle(tmp_path, build_random_gpt, write_eval_bundle):
    write_eval_bundle(tmp_path / "bundle")
    model = build_random_gpt(5, vocab_size=VOCAB)
    fast = ce.evaluate_core(model, TOK, "cpu", bundle_dir=str(tmp_path / "bundle"))
    plain = ce.evaluate_core(model, TOK, "cpu", bundle_dir=str(tmp_path / "bundle"), plain=True)
    assert fast == plain


def test_logits_from_fallback_for_models_without_it():
    """A model that takes only ids gets a full forward, sliced; one that takes logits_from is asked for less."""
    class TailModel(BigramModel):
        def __call__(self, ids, logits_from=0):
            self.calls.append((ids.shape, logits_from))
            return self.table[ids][:, logits_from:]

    table = random_table(10)
    data = [{"query": "pet:", "choices": [" cat", " car", " dog!"], "gold": 2}]
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
    tail, plain = TailModel(table), BigramModel(table)
    assert ce.score_example(0, tail, TOK, data, "cpu", meta)[1] == \
        pytest.approx(ce.score_example(0, plain, TOK, data, "cpu", meta)[1], abs=1e-6)
    assert tail.calls == [((3, len(ids_of("pet: dog!"))), 5)]  # scored tokens start at 6, predicted from 5


# -----------------------------------------------------------------------------
# 1 rank == 2 gloo ranks (a real process group)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, bundle, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=bundle)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_core_equal_on_one_and_two_ranks(tmp_path, write_eval_bundle):
    """CORE of a fixed model is deterministic and identical on 1 and 2 ranks."""
    bundle = tmp_path / "bundle"
    write_eval_bundle(bundle)
    single = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=str(bundle))
    again = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=str(bundle))
    assert single == again  # deterministic
    mp.start_processes(_rank_main, args=(2, _free_port(), str(bundle), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["results"] == pytest.approx(single["results"], abs=1e-12)
        assert out["core_metric"] == pytest.approx(single["core_metric"], abs=1e-12)
