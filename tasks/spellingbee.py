"""
Spelling and letter counting, e.g. "How many r are in strawberry?" -> 3.

1. SpellingBee: count a letter in a word. The ideal answer spells the word out, counts by hand, then
   double-checks with a python tool call ('strawberry'.count('r')) and ends with '#### 3'.
2. SimpleSpelling: just "Spell the word: cat" -> "cat:c,a,t" (the hard part of 1, condensed).

Both are generated on the fly: example i is built from random.Random(i) (test split: 10_000_000 + i), so
any index can be produced on any rank without storing anything.

Words come from dwyl/english-words words_alpha.txt (370K words). Where it comes from, in order:
the `words_file=` argument, env NANOCHAT_WORDS_FILE, $NANOCHAT_BASE_DIR/words_alpha.txt (downloaded from
WORD_LIST_URL, override with env NANOCHAT_WORDS_URL), and with no network, the lowercase words of the
offline pretraining corpus ($NANOCHAT_BASE_DIR/base_data_offline, built by `python -m nanochat.dataset --offline`).

Preview: python -m tasks.spellingbee
"""

import os
import re
import random
import string

from nanochat.common import get_base_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.download import download_file
from nanochat.fileio import atomic_write_text
from tasks.common import GeneratedTask, extract_answer, same_number

LETTERS = string.ascii_lowercase
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_RANDOM_SEED_OFFSET = GeneratedTask.TEST_SEED_OFFSET
OFFLINE_WORD_RE = re.compile(r"[A-Za-z]+")

# User message templates (data augmentation), English plus a few other languages
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    # Chinese (Simplified)
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


def _read_words(path):
    with open(path, "r", encoding="utf-8") as f:
        return [w for w in (line.strip() for line in f) if w]


def _offline_words(base_dir):
    """Lowercase alphabetic words (3-12 letters) of the offline corpus, sorted; cached next to it."""
    cache_path = os.path.join(base_dir, "words_offline.txt")
    if os.path.exists(cache_path):
        return _read_words(cache_path)
    data_dir = os.path.join(base_dir, "base_data_offline")
    if not os.path.isdir(data_dir):
        return None
    print(f"SpellingBee: word list unavailable, using the words of the offline corpus in {data_dir}")
    words = set()
    for split in ("train", "val"):
        for docs in parquets_iter_batched(split, data_dir=data_dir):
            for doc in docs:
                words.update(w.lower() for w in OFFLINE_WORD_RE.findall(doc) if 3 <= len(w) <= 12)
    words = sorted(words)
    atomic_write_text(cache_path, "\n".join(words) + "\n")
    return words


_WORD_LISTS = {}  # memo: a mixture builds several spelling tasks; find (or fail to download) the list once


def load_word_list(words_file=None):
    """The word list (see the module docstring for where it comes from)."""
    words_file = words_file or os.environ.get("NANOCHAT_WORDS_FILE")
    key = (words_file, get_base_dir(), os.environ.get("NANOCHAT_WORDS_URL"))
    if key not in _WORD_LISTS:
        _WORD_LISTS[key] = _find_word_list(words_file)
    return _WORD_LISTS[key]


def _find_word_list(words_file):
    if words_file:
        if not os.path.exists(words_file):
            raise FileNotFoundError(f"word list {words_file} does not exist (from words_file= / NANOCHAT_WORDS_FILE)")
        return _read_words(words_file)
    base_dir = get_base_dir()
    path = os.path.join(base_dir, "words_alpha.txt")
    download_error = None
    if not os.path.exists(path):
        try:
            url = os.environ.get("NANOCHAT_WORDS_URL", WORD_LIST_URL)
            download_file(url, path, desc="words_alpha.txt", retries=2, timeout=10)
        except Exception as e:  # offline: fall back to the local corpus below
            download_error = e
    if os.path.exists(path):
        return _read_words(path)
    words = _offline_words(base_dir)
    if not words:
        raise RuntimeError(
            f"SpellingBee needs a word list: downloading {WORD_LIST_URL} failed ({download_error}) and there is no "
            f"offline corpus in {os.path.join(base_dir, 'base_data_offline')}. Set NANOCHAT_WORDS_FILE to a "
            f"one-word-per-line file, or build the offline corpus with `python -m nanochat.dataset --offline`.")
    return words


class SpellingBee(GeneratedTask):

    def __init__(self, size=1000, split="train", words_file=None, **kwargs):
        super().__init__(size=size, split=split, **kwargs)
        self.words = load_word_list(words_file)

    def get_example(self, index):
        rng = self.example_rng(index)
        word = rng.choice(self.words)
        # a letter of the word 90% of the time, any letter otherwise (so the answer is sometimes 0)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)

        # the user message, with variations
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:  # lazy people don't use shift
            template = template.lower()
        quote_options = ["", "'", '"']
        letter_quote = rng.choice(quote_options)
        word_quote = rng.choice(quote_options)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:  # half of people skip the question mark
            user_msg += "?"

        # the ideal answer: spell it out, count by hand, then check with python
        manual_text = (f"We are asked to find the number '{letter}' in the word '{word}'. "
                       f"Let me try a manual approach first.\n\n"
                       f"First spell the word out:\n{word}:{','.join(word)}\n\n"
                       f"Then count the occurrences of '{letter}':\n")
        running_count = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running_count += 1
                # no space between i and char on purpose: " a" and "a" are different tokens
                manual_text += f"{i}:{char} hit! count={running_count}\n"
            else:
                manual_text += f"{i}:{char}\n"
        manual_text += f"\nThis gives us {running_count}."
        assistant_parts = [
            {"type": "text", "text": manual_text},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        messages = [
            {"role": "user", "content": user_msg},
            {"role": "assistant", "content": assistant_parts},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        """1 if the completion's #### number equals the true count (as a number: 3.0 == 3), else 0."""
        assert isinstance(assistant_response, str), "SpellingBee grades plain-string completions"
        assistant_message = conversation["messages"][-1]
        assert assistant_message["role"] == "assistant", "last message must be the assistant's"
        assert isinstance(assistant_message["content"], list), "SpellingBee reference answers are lists of parts"
        ref_num = extract_answer(assistant_message["content"][-1]["text"])
        pred_num = extract_answer(assistant_response)
        return int(same_number(pred_num, ref_num))


class SimpleSpelling(GeneratedTask):
    """Just spell words: 'Spell the word: cat' -> 'cat:c,a,t'."""

    def __init__(self, size=1000, split="train", words_file=None, **kwargs):
        super().__init__(size=size, split=split, **kwargs)
        words = list(load_word_list(words_file))
        random.Random(42).shuffle(words)  # a different word order than SpellingBee's
        self.words = words

    def get_example(self, index):
        rng = self.example_rng(index)
        word = rng.choice(self.words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        return {"messages": messages}


if __name__ == "__main__":
    task = SpellingBee()
    for i in range(5):
        ex = task[i]
        print("=" * 80)
        print(ex["messages"][0]["content"])
        print("-" * 80)
        for part in ex["messages"][1]["content"]:
            if part["type"] == "text":
                print(part["text"], end="")
            elif part["type"] == "python":
                print(f"<<{part['text']}=", end="")
            else:
                print(f"{part['text']}>>", end="")
        print()
