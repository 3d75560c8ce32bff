"""
Base class for all Tasks.

A Task is a dataset of conversations plus, usually, a way to grade a model's answer.
Examples: MMLU, ARC-Easy/Challenge, GSM8K, HumanEval, SmolTalk, SpellingBee.

Every Task is also a lightweight slicing view (start/stop/step) over its underlying examples, so
`GSM8K("main", "train", stop=500)` is the first 500 (shuffled) problems without copying anything.
"""

import random
import logging
import re
from decimal import Decimal, InvalidOperation

logger = logging.getLogger(__name__)


class Task:
    """A logical view [start:stop:step] over a dataset of conversations."""

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"start must be non-negative, got {start}"
        assert stop is None or stop >= start, f"stop must be >= start, got stop={stop}, start={start}"
        assert step >= 1, f"step must be >= 1, got {step}"
        self.start = start
        self.stop = stop  # None = up to the end of the dataset
        self.step = step

    @property
    def eval_type(self):
        """'generative' (sample a completion and grade it) or 'categorical' (pick one of a few letters)."""
        raise NotImplementedError

    def num_examples(self):
        """Number of examples in the underlying dataset (ignores the slice)."""
        raise NotImplementedError

    def get_example(self, index):
        """The conversation at a physical index of the underlying dataset."""
        raise NotImplementedError

    def __len__(self):
        num_ex = self.num_examples()
        stop = num_ex if self.stop is None else self.stop
        if stop > num_ex:
            # asking for more than exists is a common slip (e.g. stop=5000 on a 1K test set); cap it, say so once
            logger.warning(f"{type(self).__name__}: stop={stop} exceeds the dataset size {num_ex}; using {num_ex}")
            self.stop = stop = num_ex
        span = max(stop - self.start, 0)
        return (span + self.step - 1) // self.step  # ceil(span / step)

    def __getitem__(self, index):
        assert isinstance(index, int), f"index must be an int, got {type(index).__name__}"
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def evaluate(self, conversation, completion):
        """Grade a completion (string) for a conversation; returns a bool/int (1 = correct)."""
        raise NotImplementedError

    def reward(self, conversation, completion):
        """RL reward; by default just the 0/1 evaluation outcome."""
        return float(self.evaluate(conversation, completion))


# -----------------------------------------------------------------------------
# Numeric answers: "#### N" at the end of a GSM8K-style solution

HASH_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


class RowsTask(Task):
    """A task over the rows of a public dataset (tasks.hub.load_task_rows: a local file or the hub). A subclass fills
    self.rows in __init__, sets eval_type (a class attribute) and turns a row into a conversation in get_example."""
    rows = ()

    def num_examples(self):
        return len(self.rows)


def extract_answer(completion):
    """The number after the first '#### ' with commas removed (GSM8K's official normalization), or None."""
    match = HASH_ANSWER_RE.search(completion)
    if match:
        return match.group(1).strip().replace(",", "")
    return None


def same_number(predicted, reference):
    """Whether two answer strings are the same number: '1,234' == '1234', '18.0' == '18', '5.' == '5' (nanochat
    compares the strings, so a model that writes 18.0 for 18 was marked wrong). Decimal, not float: exact for
    any number of digits. Anything that is not a finite number (None, '', '1.2.3') is never equal."""
    try:
        a, b = (Decimal(str(x).replace(",", "")) for x in (predicted, reference))
    except InvalidOperation:
        return False
    return a.is_finite() and b.is_finite() and a == b


class GeneratedTask(Task):
    """A task made up on the fly: `size` examples per split, example i of a split always the same one (it is drawn
    from random.Random seeded by i; test seeds start past any train index, so the splits never share a seed)."""

    TEST_SEED_OFFSET = 10_000_000

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be train or test, got {split!r}")
        self.size = size
        self.split = split

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def example_rng(self, index):
        """The random generator that draws example `index` of this split."""
        return random.Random(index if self.split == "train" else self.TEST_SEED_OFFSET + index)


class TaskMixture(Task):
    """
    Several tasks mixed together, e.g. for SFT. The (task, index) map is shuffled with a fixed seed so
    every task is spread over the whole epoch, identically on every run and every rank.
    To oversample a task, list it more than once.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]
        self.num_conversations = sum(self.lengths)
        self.index_map = [(task_idx, local_idx)
                          for task_idx, length in enumerate(self.lengths)
                          for local_idx in range(length)]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, \
            f"index {index} out of range for a mixture of {self.num_conversations} conversations"
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """Several tasks one after another, unshuffled (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]
        self.num_conversations = sum(self.lengths)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, \
            f"index {index} out of range for a sequence of {self.num_conversations} conversations"
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt used by all categorical tasks (MMLU, ARC).

    Two deliberate details, both matter for small models:
    1) the letter comes *after* its choice ("- Paris=A"), which binds better;
    2) no space between "=" and the letter: " A" and "A" are different tokens, and the assistant's
       answer is the bare letter "A", so the prompt must contain that exact token.
    """
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query
