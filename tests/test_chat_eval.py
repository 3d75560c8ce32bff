import pytest
import torch

from nanochat.chat_eval import (BASELINES, ALL_TASKS, answer_of, chatcore, run_categorical_eval,
                                run_generative_eval)
from nanochat.core_eval import centered_accuracy

LETTERS = ["A", "B", "C", "D"]
VOCAB = 64


class LetterTokenizer:
    """Letters A-D are ids 10-13; everything else is one id per character mod 64."""

    def get_bos_token_id(self):
        return 0

    def encode(self, s):
        return [10 + LETTERS.index(s)] if s in LETTERS else [1 + (ord(c) % 50) for c in s]

    def decode(self, ids):
        return "".join(LETTERS[i - 10] if 10 <= i < 14 else "x" for i in ids)

    def render_for_completion(self, conversation):
        # prompt length depends on the question so rows in a batch have different lengths (right padding)
        return [0] + self.encode(conversation["messages"][0]["content"]) + [2]


class ControlledModel:
    """At the position after token 2 (the end of a prompt) the logits prefer the letter named by the
    prompt's first content token; padding positions carry a decoy preference for D."""

    class config:
        sequence_len = 64

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, VOCAB)
        logits[:, :, 13] = 5.0  # decoy: D everywhere
        for b in range(B):
            want = int(ids[b, 1]) % 4
            for t in range(T):
                if ids[b, t] == 2:
                    logits[b, t] = 0
                    logits[b, t, 10 + want] = 3.0
                    logits[b, t, 20] = 100.0  # a non-letter token with the highest logit must be ignored
        return logits


class FakeMCTask:
    eval_type = "categorical"

    def __init__(self, questions, golds):
        self.rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": g}],
                      "letters": LETTERS} for q, g in zip(questions, golds)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def _gold(q):
    return LETTERS[(1 + ord(q[0]) % 50) % 4]


def test_categorical_picks_the_letter_from_controlled_logits():
    questions = ["a", "bb", "ccc", "dddd", "e", "ffffff", "g"]  # different lengths -> padding in the batch
    task = FakeMCTask(questions, [_gold(q) for q in questions])
    assert run_categorical_eval(task, LetterTokenizer(), ControlledModel(), batch_size=3) == 1.0
    wrong = FakeMCTask(questions, [LETTERS[(LETTERS.index(_gold(q)) + 1) % 4] for q in questions])
    assert run_categorical_eval(wrong, LetterTokenizer(), ControlledModel(), batch_size=3) == 0.0
    # max_problems caps the number scored
    half = FakeMCTask(questions, [_gold(q) if i < 3 else "D" if _gold(q) != "D" else "A" for i, q in enumerate(questions)])
    assert run_categorical_eval(half, LetterTokenizer(), ControlledModel(), batch_size=2, max_problems=3) == 1.0


class FakeGenTask:
    eval_type = "generative"

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": ""}],
                "target": "A" if i % 2 == 0 else "B"}

    def evaluate(self, conversation, completion):
        return completion == conversation["target"]


class FixedEngine:
    def __init__(self, answers):
        self.answers = answers  # per call, list of sample completions (token lists)
        self.calls = 0

    def think_prefill_tokens(self, think=None):
        return [99] * 3 if think else []

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, **kw):
        self.kwargs, self.max_tokens = kw, max_tokens
        out = self.answers[self.calls % len(self.answers)][:num_samples]
        self.calls += 1
        return [tokens + a for a in out], [[0] * len(tokens) + [1] * len(a) for a in out]


def test_generative_is_pass_at_k():
    tok, model = LetterTokenizer(), ControlledModel()
    # every problem gets samples [A, B]: pass@1 uses only A (passes even rows), pass@2 passes all
    engine = FixedEngine([[[10], [11]]])
    assert run_generative_eval(FakeGenTask(), tok, model, engine, 1, 8, 0.0, 50, verbose=False) == 0.5
    assert run_generative_eval(FakeGenTask(), tok, model, engine, 2, 8, 1.0, 50, verbose=False) == 1.0


def test_centered_and_chatcore_baselines():
    assert set(ALL_TASKS) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    # one centering for CORE and ChatCORE: baselines in percent, as in CORE's eval_meta_data.csv
    assert centered_accuracy(0.25, BASELINES["MMLU"]) == 0.0
    assert centered_accuracy(1.0, BASELINES["ARC-Easy"]) == 1.0
    assert centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert centered_accuracy(0.3, BASELINES["GSM8K"]) == pytest.approx(0.3)


def test_chatcore_is_the_mean_centered_accuracy_of_all_six_tasks():
    results = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.3, "HumanEval": 0.1,
               "SpellingBee": 0.5, "Arithmetic": 0.9}  # Arithmetic is not a ChatCORE task: it must not count
    assert chatcore(results) == pytest.approx((0.5 + 0.0 + 1.0 + 0.3 + 0.1 + 0.5) / 6)
    del results["HumanEval"]
    assert chatcore(results) is None  # a partial run has no ChatCORE


def test_think_answers_are_graded_after_the_think_block():
    assert answer_of("<think>\nit is A\n</think>\nB") == "B"
    assert answer_of("  <think>A A A and no end") == ""  # an unclosed think is no answer, never its reasoning
    assert answer_of("    return x\n") == "    return x\n"  # no think block: untouched (code keeps its indent)


def test_generative_passes_the_think_mode_and_leaves_room_for_its_prefill():
    tok, model = LetterTokenizer(), ControlledModel()
    engine = FixedEngine([[[10]]])
    run_generative_eval(FakeGenTask(), tok, model, engine, 1, 1000, 0.0, 50, verbose=False, think="on")
    assert engine.kwargs["think"] == "on"
    last_prompt = tok.render_for_completion(FakeGenTask()[3])
    assert engine.max_tokens == ControlledModel.config.sequence_len - len(last_prompt) - 3  # 3: the prefill


def test_categorical_reads_the_letter_after_the_prompt_suffix():
    questions = ["a", "bb", "ccc", "dddd"]
    task = FakeMCTask(questions, [_gold(q) for q in questions])
    # the model prefers the right letter only right after token 2: a suffix ending in 2 keeps it, one that
    # does not moves the read position onto the decoy
    assert run_categorical_eval(task, LetterTokenizer(), ControlledModel(), batch_size=2, prompt_suffix=[5, 2]) == 1.0
    assert run_categorical_eval(task, LetterTokenizer(), ControlledModel(), batch_size=2, prompt_suffix=[2, 5]) < 1.0
