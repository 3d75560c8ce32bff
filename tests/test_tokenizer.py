"""Tokenizer: training, special ids, round trips, nanochat pickle compatibility, token_bytes, chat rendering."""
import os
import pickle
import random

import pytest
import tiktoken
import torch

from nanochat.cli import UserError
from nanochat.chat_format import (THINK_PREFILL, assistant_content, assistant_parts_from_tokens, split_reasoning,
                                  think_block, validate_conversation)
from nanochat.tools import tool_call_json
from nanochat.tokenizer import (
    SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, build_encoding, compute_token_bytes, get_token_bytes,
    get_tokenizer, save_token_bytes,
)

VOCAB_SIZE = 400

WORDS = ("the quick brown fox jumps over lazy dog tokenizer model train data python print return def class "
         "I'm you're it's we've they'll").split()
EXTRA = ["你好世界", "東京は日本の首都です", "안녕하세요 세계", "🌍🚀✨", "naïve café", "x = [i**2 for i in range(10)]",
         "\\frac{a}{b} + \\sum_{k=1}^{n} k^2", "3.14159 2718 42", "\tindented\r\nline"]


def make_corpus(num_docs=300, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        words.insert(rng.randrange(len(words)), rng.choice(EXTRA))
        words.append(str(rng.randint(0, 99999)))
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB_SIZE)


def random_unicode(rng, n):
    """Random code points from every plane we care about, never surrogates (those are tested separately)."""
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x2FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# vocabulary and specials

def test_vocab_size_and_special_ids_at_the_top(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.encode_special(name) == VOCAB_SIZE - len(SPECIAL_TOKENS) + i
    assert tok.get_bos_token_id() == VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert set(tok.get_special_tokens()) == set(SPECIAL_TOKENS)
    assert tok.enc.name == "rustbpe" and tok.enc._pat_str == SPLIT_PATTERN
    assert tok.id_to_token(tok.encode(" the")[0]) == " the"  # a trained merge
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"


def test_vocab_size_too_small_is_an_error():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), 260)


# ---------------------------------------------------------------------------------------------------------
# encode / decode

def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(1)
    texts = EXTRA + ["", " ", "\n\n\n", "\x00", "e\u0301", "👨‍👩‍👧‍👦 family", "🇫🇷", "a" * 5000]
    texts += [random_unicode(rng, rng.randint(1, 300)) for _ in range(50)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode(texts)] == texts


def test_lone_surrogates_become_replacement_char(tok):
    # documented rule: lone surrogates can't be UTF-8, so each becomes U+FFFD; nothing crashes
    texts = ["abc\ud800def", "\udfff", "x\ud83c", "ok \udc80\udc80 ok"]
    expected = ["abc\ufffddef", "\ufffd", "x\ufffd", "ok \ufffd\ufffd ok"]
    assert [tok.decode(tok.encode(t)) for t in texts] == expected
    assert [tok.decode(ids) for ids in tok.encode(texts)] == expected
    assert tok.encode("abc\ud800def") == tok.encode("abc\ufffddef")


def test_special_token_text_is_not_special(tok):
    for text in ["<|bos|>", "hi <|user_start|> there <|assistant_end|>", "<|output_end|><|bos|>"]:
        ids = tok.encode(text)
        assert not set(ids) & {tok.encode_special(s) for s in SPECIAL_TOKENS}
        assert tok.decode(ids) == text
        assert not set(tok.encode([text])[0]) & {tok.encode_special(s) for s in SPECIAL_TOKENS}


def test_prepend_append_by_name_and_id(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode("hello world", append="<|assistant_end|>") == body + [end]
    assert tok.encode(["hello world", ""], prepend=bos, append="<|assistant_end|>") == [[bos] + body + [end], [bos, end]]
    assert tok("hello world") == body


def test_batch_encode_equals_single_encode(tok):
    docs = make_corpus(num_docs=64, seed=7) + [""] + EXTRA
    batch = tok.encode(docs, num_threads=4)
    assert batch == [tok.encode(d) for d in docs]
    assert tok.encode(docs, num_threads=1) == batch
    assert tok.encode([]) == []
    with pytest.raises(ValueError, match="str or a list"):
        tok.encode(42)


# ---------------------------------------------------------------------------------------------------------
# persistence: nanochat's tokenizer.pkl

def test_nanochat_style_pickle_loads_and_encodes_identically(tok, tmp_path):
    # nanochat writes pickle.dump(tiktoken.Encoding(name="rustbpe", ...)); build one independently of our save()
    ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS))}
    specials = {name: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    raw = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(raw, f)
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    texts = make_corpus(num_docs=30, seed=3) + EXTRA
    assert loaded.encode(texts) == [raw.encode_ordinary(t) for t in texts]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.get_bos_token_id() == specials["<|bos|>"]
    assert loaded.get_vocab_size() == VOCAB_SIZE


def test_save_writes_a_plain_pickled_encoding(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer"))
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "rb") as f:
        raw = pickle.load(f)  # exactly what nanochat's from_directory does
    assert isinstance(raw, tiktoken.Encoding) and raw.n_vocab == VOCAB_SIZE
    text = "some text 你好 🌍 123456"
    assert raw.encode_ordinary(text) == tok.encode(text)
    assert RustBPETokenizer.from_directory(str(tmp_path / "tokenizer")).encode(text) == tok.encode(text)


def test_missing_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        RustBPETokenizer.from_directory(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_token_bytes()


def test_get_tokenizer_and_get_token_bytes_use_base_dir(tok, _isolated_base_dir):
    tokenizer_dir = os.path.join(str(_isolated_base_dir), "tokenizer")
    tok.save(tokenizer_dir)
    written = save_token_bytes(tok, tokenizer_dir)
    assert get_tokenizer().encode("the dog") == tok.encode("the dog")
    assert torch.equal(get_token_bytes(), written)


# ---------------------------------------------------------------------------------------------------------
# token_bytes

def test_token_bytes_sum_to_utf8_length(tok):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    assert (token_bytes[:-len(SPECIAL_TOKENS)] > 0).all()
    # independent check: over any text, the bytes of its tokens add up to its UTF-8 length
    rng = random.Random(5)
    for text in EXTRA + [random_unicode(rng, 200) for _ in range(20)]:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_partial_utf8_tokens(tok):
    token_bytes = compute_token_bytes(tok)
    # byte tokens 0x80..0xFF are partial UTF-8: they stand for 1 byte (decoding them to str would count 3)
    for b in range(0x80, 0x100):
        token_id = tok.enc.encode_single_token(bytes([b]))
        assert token_bytes[token_id] == 1
    # a trained merge that is not valid UTF-8 on its own (a piece of a CJK character)
    partial = []
    for i in range(256, VOCAB_SIZE - len(SPECIAL_TOKENS)):
        raw = tok.enc.decode_single_token_bytes(i)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial.append((i, raw))
    assert partial, "the corpus should produce merges inside multi-byte characters"
    for i, raw in partial:
        assert token_bytes[i] == len(raw) != len(tok.id_to_token(i).encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# conversation rendering

def expected_render(tok, pieces):
    """Build (ids, mask) from (special-name | text, mask) pieces: the plain statement of the layout."""
    ids, mask = [], []
    for piece, m in pieces:
        piece_ids = [tok.encode_special(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece)
        ids += piece_ids
        mask += [m] * len(piece_ids)
    return ids, mask


def test_render_masks_every_part_type_and_think(tok):
    think_answer = "<think>the user greets me</think>Hello!"
    conversation = {"messages": [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": think_answer},
        {"role": "user", "content": "what is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "<think>use the tool</think>Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conversation)
    assert (ids, mask) == expected_render(tok, [
        ("<|bos|>", 0),
        ("<|user_start|>", 0), ("hi there", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), (think_answer, 1), ("<|assistant_end|>", 1),
        ("<|user_start|>", 0), ("what is 2+3?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("<think>use the tool</think>Let me compute. ", 1),
        ("<|python_start|>", 1), ("2+3", 1), ("<|python_end|>", 1),
        ("<|output_start|>", 0), ("5", 0), ("<|output_end|>", 0),
        ("It is 5.", 1), ("<|assistant_end|>", 1),
    ])
    # think tags are ordinary text, never special ids
    assert tok.decode(ids).count("<think>") == 2
    assert "\033[92m" in tok.visualize_tokenization(ids, mask) and "\033[91m" in tok.visualize_tokenization(ids, mask)
    assert f"({ids[0]})" in tok.visualize_tokenization(ids, mask, with_token_id=True)


def test_render_bare_list_and_system_merge(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    original = [dict(m) for m in messages]
    ids, mask = tok.render_conversation(messages)
    assert (ids, mask) == tok.render_conversation({"messages": messages})
    assert (ids, mask) == expected_render(tok, [
        ("<|bos|>", 0), ("<|user_start|>", 0), ("Be brief.\n\nhi", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("hello", 1), ("<|assistant_end|>", 1)])
    assert messages == original  # the caller's conversation is not mutated


def test_render_rejects_malformed(tok):
    bad = [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": ["not", "a", "string"]}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}],
        [],
    ]
    for conversation in bad:
        with pytest.raises(ValueError):
            tok.render_conversation(conversation)


def test_render_truncation_is_a_prefix(tok):
    conversation = [{"role": "user", "content": " ".join(WORDS * 3)}, {"role": "assistant", "content": "ok " * 50}]
    full_ids, full_mask = tok.render_conversation(conversation, max_tokens=None)
    assert len(full_ids) > 60
    for limit in (1, 10, 60, len(full_ids), len(full_ids) + 5):
        ids, mask = tok.render_conversation(conversation, max_tokens=limit)
        assert ids == full_ids[:limit] and mask == full_mask[:limit]
    assert tok.render_conversation(conversation) == (full_ids, full_mask)  # default 2048 is above its length


def test_render_for_completion(tok):
    conversation = {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    prompt = tok.render_for_completion(conversation)
    prefix_ids, _ = tok.render_conversation(conversation["messages"][:-1])
    assert prompt == prefix_ids + [tok.encode_special("<|assistant_start|>")]
    assert len(conversation["messages"]) == 5  # not mutated
    # a conversation that already ends with the user's question gives the same prompt
    assert tok.render_for_completion(conversation["messages"][:-1]) == prompt
    # no silent truncation of long prompts (nanochat cut them to 2048 and dropped the question)
    long_conversation = [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "x"}]
    long_prompt = tok.render_for_completion(long_conversation)
    assert len(long_prompt) > 2048 and long_prompt[-2] == tok.encode_special("<|user_end|>")


def test_build_encoding_layout():
    ranks = {bytes([i]): i for i in range(256)}
    enc = build_encoding(ranks)
    assert enc.n_vocab == 256 + len(SPECIAL_TOKENS)
    assert enc.encode_single_token("<|output_end|>") == 256 + len(SPECIAL_TOKENS) - 1


def test_training_text_with_lone_surrogates_does_not_crash():
    # rustbpe alone raises UnicodeEncodeError on these (they can come from JSON escapes like "\ud800")
    docs = make_corpus(num_docs=50) + ["broken \ud800 text", "\udc00\udc00 more 你好"]
    tok = RustBPETokenizer.train_from_iterator(iter(docs), 300)
    assert tok.decode(tok.encode("broken \ud800 text")) == "broken \ufffd text"


# ---------------------------------------------------------------------------------------------------------
# scripts.tok_train (data injected as batches, as nanochat.dataset.parquets_iter_batched yields them)

def test_tok_train_text_iterator_caps_docs_and_stops():
    from scripts.tok_train import text_iterator
    batches = [["a" * 50, "b" * 5], ["c" * 30, "d" * 30, "e" * 30]]
    docs, stats = text_iterator(iter(batches), max_chars=80, doc_cap=20)
    assert list(docs) == ["a" * 20, "b" * 5, "c" * 20, "d" * 20, "e" * 20]  # stops once more than 80 were read
    assert stats == {"chars": 85, "docs": 5}
    docs, stats = text_iterator(iter(batches), max_chars=10**9, doc_cap=10**9)
    assert list(docs) == [doc for batch in batches for doc in batch]


def test_tok_train_main_writes_tokenizer_token_bytes_and_report(_isolated_base_dir):
    from scripts.tok_train import main
    corpus = make_corpus(num_docs=200, seed=11)
    batches = [corpus[i:i + 32] for i in range(0, len(corpus), 32)]
    results = main(["--vocab-size", "320", "--max-chars", "10000000", "--doc-cap", "400"], batches=iter(batches))
    assert results["train_chars"] == sum(min(len(d), 400) for d in corpus)
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 320
    assert torch.equal(get_token_bytes(), compute_token_bytes(tok))
    report = (_isolated_base_dir / "report" / "tokenizer-training.md").read_text()
    assert "vocab_size: 320" in report and "train_time" in report
    with pytest.raises(UserError, match="No training text"):
        main(["--force"], batches=iter([]))


def test_tok_eval_table_and_report_offline(tok, _isolated_base_dir, monkeypatch, capsys):
    import scripts.tok_eval as tok_eval
    tok.save(os.path.join(str(_isolated_base_dir), "tokenizer"))

    def fake_from_pretrained(name):  # GPT-2 "loads" (as our own tokenizer), GPT-4 is offline
        if name == "gpt2":
            return tok
        raise RuntimeError("offline") from ConnectionError("no network")
    monkeypatch.setattr(tok_eval.RustBPETokenizer, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(tok_eval, "data_texts", lambda data_dir: [("extra", "你好 the dog 🌍")])
    results = tok_eval.main([])
    out = capsys.readouterr().out
    assert set(results) == {"Ours", "GPT-2"}
    for name, text in tok_eval.SAMPLE_TEXTS + [("extra", "你好 the dog 🌍")]:
        assert results["Ours"][name]["tokens"] == len(tok.encode(text))
        assert results["Ours"][name]["bytes"] == len(text.encode("utf-8"))
        assert f"\n{name:<12}" in out
    assert "vs GPT-2" in out and "+0.0%" in out and "GPT-4 (cl100k_base) not compared" in out
    report = (_isolated_base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "| korean |" in report and "not compared" in report


# ---------------------------------------------------------------------------------------------------------
# think -> tool call -> answer turns: render, masks, round trip, and the inference prompt as a trained prefix

def think_tool_conversation():
    def T(text):
        return {"type": "text", "text": text}
    return [
        {"role": "system", "content": "You are nanochat."},
        {"role": "user", "content": "What's the weather in Seoul?"},
        {"role": "assistant", "content": [
            T(think_block("Weather changes every day, so I should search for it.")),
            {"type": "python", "text": tool_call_json("web_search", query="What's the weather in Seoul?")},
            {"type": "python_output", "text": "[1] Weather in Seoul today\nfile:///docs/seoul.md\nSunny, 27°C."},
            T("It is sunny and 27°C in Seoul.")]},
        {"role": "user", "content": "And a 17% tip on $45?"},
        {"role": "assistant", "content": [
            T(think_block("17% of $45 is 45 * 0.17.")), {"type": "python", "text": "45 * 0.17"},
            {"type": "python_output", "text": "7.65"}, T("The tip is $7.65.")]},
        {"role": "user", "content": "How do airplanes fly?"},
        {"role": "assistant", "content": think_block("This is an explanation, no tool.") + "Wings push air down."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": think_block("") + "You're welcome!"},  # think "off": an empty block
    ]


def test_think_tool_turns_render_as_prefixes_of_longer_conversations(tok):
    messages = think_tool_conversation()
    assert validate_conversation(messages) == []
    previous_ids, previous_mask = [], []
    for k in range(2, len(messages) + 1):  # a system message alone does not render
        ids, mask = tok.render_conversation(messages[:k], max_tokens=None)
        assert ids[:len(previous_ids)] == previous_ids and mask[:len(previous_mask)] == previous_mask
        previous_ids, previous_mask = ids, mask


def test_think_tool_turns_mask_outputs_and_user_text_only(tok):
    ids, mask = tok.render_conversation(think_tool_conversation(), max_tokens=None)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    for text in ("<think>\nWeather changes every day", '{"tool": "web_search"', "It is sunny", "45 * 0.17",
                 "The tip is $7.65.", "<think>\n</think>\nYou're welcome!"):
        assert text in trained
    for text in ("Sunny, 27°C.", "7.65<|output_end|>", "How do airplanes fly?", "You are nanochat."):
        assert text in untrained and text not in trained


def test_think_tool_turns_round_trip_through_the_generated_tokens(tok):
    messages = think_tool_conversation()
    ids, _ = tok.render_conversation(messages, max_tokens=None)
    start, end = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|assistant_end|>")
    turns = []
    while start in ids:
        ids = ids[ids.index(start) + 1:]
        turns.append(ids[:ids.index(end) + 1])  # what the engine would have generated, <|assistant_end|> included
    originals = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [assistant_content(assistant_parts_from_tokens(tok, turn)) for turn in turns] == originals


def test_inference_prompt_plus_think_prefill_is_what_training_rendered(tok):
    """render_for_completion + the Engine's think prefill are exactly the first tokens of the trained turn, so the
    model continues from a state it saw in training (on: reasoning follows; off: the answer or a call follows)."""
    messages = think_tool_conversation()
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        first_text = content if isinstance(content, str) else content[0]["text"]
        mode = "on" if split_reasoning(first_text)[0] else "off"
        prompt = tok.render_for_completion(messages[:i]) + tok.encode(THINK_PREFILL[mode])
        trained, _ = tok.render_conversation(messages[:i + 1], max_tokens=None)
        assert trained[:len(prompt)] == prompt, (i, mode)
