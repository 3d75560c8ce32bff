"""
Engine tests. Two kinds of model:
- mocks (uniform or scripted logits) for sampling, tool-use, stopping and length rules;
- a tiny real GPT with every parameter randomised (so attention, smear, value embeddings and backout all
  matter), checked against naive full-recompute generation.
"""

from dataclasses import dataclass

import pytest
import torch

from nanochat.engine import Engine, KVCache, fit_conversation_to_context, sample_next_token
from nanochat.tools import calculator_tool

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, the 9 specials follow (256..264)."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIALS)}

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def get_vocab_size(self):
        return 256 + len(SPECIALS)

    def encode(self, text, prepend=None, append=None):
        ids = list(text.encode("utf-8"))
        if prepend is not None:
            ids = [prepend if isinstance(prepend, int) else self.special[prepend]] + ids
        if append is not None:
            ids = ids + [append if isinstance(append, int) else self.special[append]]
        return ids

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
S = TOK.special
VOCAB = TOK.get_vocab_size()
PROMPT = [S["<|bos|>"], *TOK.encode("Hello")]


@dataclass
class MockConfig:
    sequence_len: int = 64
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 16


class MockModel:
    """Uniform logits (every token equally likely), or scripted: row b emits scripts[b][t] as its t-th
    generated token (a scripted position that a tool forces is simply skipped by the engine)."""

    def __init__(self, scripts=None, sequence_len=64):
        self.config = MockConfig(sequence_len=sequence_len)
        self.scripts = scripts
        self.calls = []  # (batch, T) of every forward
        self.threads = []  # torch intra-op threads during every forward

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None, last_logits_only=False):
        B, T = ids.shape
        self.calls.append((B, T))
        self.threads.append(torch.get_num_threads())
        pos = kv_cache.get_pos()
        kv_cache.advance(T)
        logits = torch.zeros(B, T, VOCAB)
        if self.scripts is not None:
            generated = pos + T - len(PROMPT)  # index of the token the last position predicts
            for b in range(B):
                script = self.scripts[b % len(self.scripts)]
                logits[b, -1, script[min(generated, len(script) - 1)]] = 10.0
        return logits


# -----------------------------------------------------------------------------
# sampling

def test_kv_cache_is_reexported():
    from nanochat.kv_cache import KVCache as Original
    assert KVCache is Original


def test_sample_temperature_zero_is_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        out = sample_next_token(logits, torch.Generator().manual_seed(seed), temperature=0.0)
        assert out.shape == (5, 1)
        assert torch.equal(out[:, 0], logits.argmax(dim=-1))


def test_top_k_restricts_support():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).expand(4000, -1)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    out = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=1.5, top_k=5)
    seen = set(out[:, 0].tolist())
    assert seen <= allowed and len(seen) == 5  # only the top 5, and all of them (4000 draws)


def test_top_p_restricts_support():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    logits = probs.log().unsqueeze(0).expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    # tokens ranked above token 1 hold 0.5 < 0.7, above token 2 hold 0.8 >= 0.7: support {0, 1}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.7)[:, 0].tolist()) == {0, 1}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.85)[:, 0].tolist()) == {0, 1, 2}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.01)[:, 0].tolist()) == {0}
    # combined with top_k, top_p applies within the k kept tokens
    assert set(sample_next_token(logits, rng, temperature=1.0, top_k=2, top_p=0.99)[:, 0].tolist()) == {0, 1}
    # top_p=1 leaves the distribution alone
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=1.0)[:, 0].tolist()) == {0, 1, 2, 3, 4}


def test_top_p_keeps_frequencies_proportional():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    logits = probs.log().unsqueeze(0).expand(20000, -1)
    out = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=1.0, top_p=0.7)[:, 0]
    frac0 = (out == 0).float().mean().item()
    assert abs(frac0 - 0.5 / 0.8) < 0.02  # renormalised over the kept {0, 1}


def test_sampling_matches_the_softmax_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    for temperature in (1.0, 0.7):
        draws = sample_next_token(logits.expand(40000, -1), torch.Generator().manual_seed(1), temperature)[:, 0]
        freq = torch.bincount(draws, minlength=5).float() / draws.numel()
        torch.testing.assert_close(freq, torch.softmax(logits / temperature, dim=-1), atol=0.01, rtol=0)


def test_zero_probability_tokens_are_never_sampled():
    # at a low temperature most of the vocabulary underflows to probability exactly 0
    logits = torch.linspace(-15, 15, VOCAB).flip(0).unsqueeze(0).expand(5000, -1)
    draws = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=0.05)[:, 0]
    probs = torch.softmax(logits[0] / 0.05, dim=-1)
    assert (probs[draws] > 0).all() and (probs == 0).any()


# -----------------------------------------------------------------------------
# engine with mock models

def first_columns(engine, **kw):
    return [column for column, _ in engine.generate(PROMPT, **kw)]


def test_multi_sample_first_tokens_are_independent():
    engine = Engine(MockModel(), TOK)
    first = first_columns(engine, num_samples=16, max_tokens=1, temperature=1.0)[0]
    assert len(first) == 16 and len(set(first)) > 1  # identical would be (1/265)^15


def test_prefill_runs_once_at_batch_one():
    model = MockModel()
    Engine(model, TOK).generate_batch(PROMPT, num_samples=4, max_tokens=3, temperature=0.0)
    assert model.calls[0] == (1, len(PROMPT))
    assert all(call == (4, 1) for call in model.calls[1:]) and len(model.calls) == 3


def test_decode_threads_apply_to_decode_steps_only():
    model = MockModel()
    torch.set_num_threads(2)  # conftest's fixture resets it for the next test
    try:
        seen_by_consumer = [torch.get_num_threads() for _ in Engine(model, TOK, decode_threads=1).generate(
            PROMPT, max_tokens=4)]
        assert seen_by_consumer == [2] * 4
        assert model.threads == [2, 1, 1, 1]  # prefill keeps the process setting
        model.threads.clear()
        list(Engine(model, TOK, decode_threads=None).generate(PROMPT, max_tokens=3))
        assert model.threads == [2, 2, 2]
    finally:
        torch.set_num_threads(1)


def test_same_seed_same_output_and_seeds_differ():
    engine = Engine(MockModel(), TOK)
    outputs = set()
    for seed in (1, 42, 123, 999, 1000):
        r1, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=8, seed=seed)
        r2, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=8, seed=seed)
        assert r1 == r2
        outputs.add(tuple(r1[0]))
    assert len(outputs) > 1


def test_temperature_zero_ignores_seed():
    engine = Engine(MockModel(scripts=[TOK.encode("deterministic")]), TOK)
    results = {tuple(engine.generate_batch(PROMPT, temperature=0.0, max_tokens=8, seed=s)[0][0]) for s in (1, 2, 3)}
    assert len(results) == 1
    assert list(results.pop()) == PROMPT + TOK.encode("determin")


@pytest.mark.parametrize("max_tokens", [1, 4, 16])
def test_max_tokens_and_num_samples(max_tokens):
    engine = Engine(MockModel(scripts=[[ord("a")]]), TOK)
    results, masks = engine.generate_batch(PROMPT, num_samples=3, max_tokens=max_tokens, temperature=0.0)
    assert len(results) == 3
    assert all(len(r) == len(PROMPT) + max_tokens for r in results)
    assert all(m == [0] * len(PROMPT) + [1] * max_tokens for m in masks)


def test_generation_never_exceeds_sequence_len():
    model = MockModel(scripts=[[ord("a")]], sequence_len=20)
    engine = Engine(model, TOK)
    results, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=1000, temperature=0.0)
    assert all(len(r) == 20 for r in results)  # capped to the context, not an error
    results, _ = engine.generate_batch(PROMPT, max_tokens=None, temperature=0.0)
    assert len(results[0]) == 20
    assert engine.max_new_tokens(len(PROMPT), None) == 20 - len(PROMPT)
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([S["<|bos|>"]] + [ord("x")] * 19, max_tokens=5))


def test_rows_stop_on_assistant_end_and_bos():
    scripts = [TOK.encode("hi") + [S["<|assistant_end|>"]],
               TOK.encode("hello") + [S["<|bos|>"]],
               TOK.encode("h") + [S["<|assistant_end|>"]]]  # the first token comes from the shared prompt
    model = MockModel(scripts=scripts)
    engine = Engine(model, TOK)
    columns = first_columns(engine, num_samples=3, max_tokens=50, temperature=0.0)
    assert len(columns) == 6  # the longest row: "hello" + <|bos|>, then everything stops
    results, masks = engine.generate_batch(PROMPT, num_samples=3, max_tokens=50, temperature=0.0)
    assert [r[len(PROMPT):] for r in results] == [TOK.encode("hi"), TOK.encode("hello"), TOK.encode("h")]
    assert all(len(m) == len(r) for m, r in zip(masks, results))


def tool_script(code, after):
    """python_start code python_end, room for the forced output (skipped), then `after`."""
    return [S["<|python_start|>"], *TOK.encode(code), S["<|python_end|>"], *after]


def test_calculator_output_is_forced_and_masked():
    after = TOK.encode(" ok") + [S["<|assistant_end|>"]]
    result_text = calculator_tool("12/60")
    forced = [S["<|output_start|>"], *TOK.encode(result_text), S["<|output_end|>"]]
    # the scripted model's positions for the forced tokens are placeholders ("?")
    script = tool_script("12/60", [ord("?")] * len(forced) + after)
    engine = Engine(MockModel(scripts=[script]), TOK)
    results, masks = engine.generate_batch(PROMPT, max_tokens=60, temperature=0.0)
    generated, gen_masks = results[0][len(PROMPT):], masks[0][len(PROMPT):]
    call = [S["<|python_start|>"], *TOK.encode("12/60"), S["<|python_end|>"]]
    assert generated == call + forced + TOK.encode(" ok")
    assert gen_masks == [1] * len(call) + [0] * len(forced) + [1] * 3
    assert result_text == "0.2"


def test_calculator_refusal_and_no_tools_force_nothing():
    after = TOK.encode("z") + [S["<|assistant_end|>"]]
    for code, tools in (("__import__('os').system('x')", "calculator"), ("1+1", None)):
        script = tool_script(code, after)
        results, masks = Engine(MockModel(scripts=[script]), TOK, tools=tools).generate_batch(
            PROMPT, max_tokens=80, temperature=0.0)
        assert results[0][len(PROMPT):] == script[:-1]  # the model's own tokens only
        assert 0 not in masks[0][len(PROMPT):]


def test_tool_is_per_row():
    after = TOK.encode("a") + [S["<|assistant_end|>"]]
    forced = [S["<|output_start|>"], *TOK.encode("4"), S["<|output_end|>"]]
    scripts = [tool_script("2+2", [ord("?")] * len(forced) + after),
               [S["<|python_start|>"]] + TOK.encode("plain") + [S["<|assistant_end|>"]]]  # never closes the block
    results, masks = Engine(MockModel(scripts=scripts), TOK).generate_batch(PROMPT, num_samples=2, max_tokens=40,
                                                                             temperature=0.0)
    assert forced[1] in results[0] and masks[0].count(0) == len(PROMPT) + len(forced)
    assert results[1][len(PROMPT):] == [S["<|python_start|>"]] + TOK.encode("plain")
    assert masks[1].count(0) == len(PROMPT)


def test_custom_tool_function():
    seen = []

    def tool(code):
        seen.append(code)
        return "RESULT"
    forced = [S["<|output_start|>"], *TOK.encode("RESULT"), S["<|output_end|>"]]
    script = tool_script("search cats", [ord("?")] * len(forced) + [S["<|assistant_end|>"]])
    results, _ = Engine(MockModel(scripts=[script]), TOK, tools=tool).generate_batch(PROMPT, max_tokens=40,
                                                                                     temperature=0.0)
    assert seen == ["search cats"] and results[0][-len(forced):] == forced


def test_finished_rows_do_not_run_tools():
    calls = []
    scripts = [TOK.encode("a") + [S["<|assistant_end|>"]] + tool_script("1+1", TOK.encode("zzzz")),
               TOK.encode("abcdefghijklmnop") + [S["<|assistant_end|>"]]]
    engine = Engine(MockModel(scripts=scripts), TOK, tools=lambda code: calls.append(code) or "2")
    results, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=40, temperature=0.0)
    assert calls == [] and results[0][len(PROMPT):] == TOK.encode("a")


def test_unknown_tool_name_is_an_error():
    with pytest.raises(ValueError, match="unknown tool"):
        Engine(MockModel(), TOK, tools="web")


def test_bad_prompt_is_an_error():
    engine = Engine(MockModel(), TOK)
    with pytest.raises(TypeError):
        next(engine.generate([]))
    with pytest.raises(TypeError):
        next(engine.generate("hello"))


# -----------------------------------------------------------------------------
# context-window management (with the real tokenizer's chat template, byte-level so it needs no training)

@pytest.fixture(scope="module")
def chat_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer, build_encoding
    return RustBPETokenizer(build_encoding({bytes([i]): i for i in range(256)}), "<|bos|>")


def chat(n_turns, system=None, turn_len=40):
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"question {i} " + "q" * turn_len})
        messages.append({"role": "assistant", "content": f"answer {i} " + "a" * turn_len})
    messages.append({"role": "user", "content": "final question?"})
    return messages


def test_fit_keeps_a_conversation_that_fits(chat_tokenizer):
    conv = {"messages": chat(2, system="be nice"), "id": 7}
    ids, kept = fit_conversation_to_context(chat_tokenizer, conv, max_context=4096, max_new_tokens=100)
    assert kept == conv and ids == chat_tokenizer.render_for_completion(conv)


def test_fit_drops_oldest_turns_keeping_system_and_last_question(chat_tokenizer):
    messages = chat(10, system="SYSTEM PROMPT")
    full = chat_tokenizer.render_for_completion(messages)
    max_context, max_new = len(full) // 2, 50
    ids, kept = fit_conversation_to_context(chat_tokenizer, messages, max_context, max_new_tokens=max_new)
    assert len(ids) + max_new <= max_context
    assert ids == chat_tokenizer.render_for_completion(kept)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]  # a suffix of whole exchanges
    assert [m["role"] for m in kept[1:]] == ["user", "assistant"] * ((len(kept) - 2) // 2) + ["user"]
    # one more exchange would not have fit
    bigger = [messages[0]] + messages[len(messages) - len(kept) - 1:]
    assert len(chat_tokenizer.render_for_completion(bigger)) + max_new > max_context


def test_fit_drops_a_trailing_assistant_message(chat_tokenizer):
    messages = chat(1) + [{"role": "assistant", "content": "to be completed"}]
    ids, kept = fit_conversation_to_context(chat_tokenizer, messages, 4096)
    assert kept == messages[:-1] and ids[-1] == chat_tokenizer.encode_special("<|assistant_start|>")


def test_fit_shortens_system_then_last_user_message(chat_tokenizer):
    messages = [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "U" * 300 + " the end?"}]
    ids, kept = fit_conversation_to_context(chat_tokenizer, messages, max_context=400, max_new_tokens=20)
    assert len(ids) + 20 <= 400 and kept[-1] == messages[-1]
    assert messages[0]["content"].startswith(kept[0]["content"]) and len(kept[0]["content"]) < 300
    ids, kept = fit_conversation_to_context(chat_tokenizer, messages, max_context=200, max_new_tokens=20)
    assert len(ids) + 20 <= 200 and len(kept) == 1  # system dropped
    assert kept[0]["content"].endswith(" the end?") and len(ids) + 20 >= 195  # kept as much as fits
    with pytest.raises(ValueError, match="cannot hold"):
        fit_conversation_to_context(chat_tokenizer, messages, max_context=10, max_new_tokens=8)


# -----------------------------------------------------------------------------
# a tiny real GPT against naive full-recompute generation

def tiny_gpt(seed=0, sequence_len=64, vocab_size=VOCAB):
    """A tiny GPT (also used by other test files) with every parameter random and non-zero."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SL", short_window=8)  # GQA, and a window the decode runs past
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    # init_weights zeroes the output projections and smear: randomise everything so every path matters
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 1.0 if "wte" in name or "value_embeds" in name else p.size(1) ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(0.5 + 0.3 * torch.rand(p.shape, generator=gen))  # lambdas, smear, backout all non-zero
    model.eval()
    return model


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


def random_prompt(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [S["<|bos|>"]] + torch.randint(0, 256, (n - 1,), generator=gen).tolist()


def test_kv_cache_decode_logits_match_full_forward(gpt):
    tokens = random_prompt(40)
    with torch.inference_mode():
        full = gpt(torch.tensor([tokens]))
        cache = KVCache.for_model(gpt, 1, 64)
        chunks = [gpt(torch.tensor([tokens[:12]]), kv_cache=cache), gpt(torch.tensor([tokens[12:20]]), kv_cache=cache)]
        chunks += [gpt(torch.tensor([[t]]), kv_cache=cache) for t in tokens[20:]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_engine_greedy_matches_naive_generate(gpt, num_samples):
    prompt = random_prompt(10, seed=1)
    naive = list(gpt.generate(prompt, max_tokens=30, temperature=0.0))
    engine = Engine(gpt, TOK, tools=None)
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=30, temperature=0.0)
    stop = {S["<|assistant_end|>"], S["<|bos|>"]}
    expected = naive[:next((i for i, t in enumerate(naive) if t in stop), len(naive))]
    assert len(set(naive)) > 3  # a real, varied continuation
    for row in results:
        assert row == prompt + expected


def test_engine_samples_are_reproducible_and_diverse(gpt):
    prompt = random_prompt(8, seed=2)
    engine = Engine(gpt, TOK, tools=None)
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=5)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=5)
    assert a == b
    assert len({tuple(r) for r in a}) > 1


def test_engine_fills_the_context_exactly(gpt):
    prompt = random_prompt(58, seed=3)
    engine = Engine(gpt, TOK, tools=None)
    columns = [column for column, _ in engine.generate(prompt, num_samples=2, max_tokens=100, temperature=0.0)]
    assert len(prompt) + len(columns) == gpt.config.sequence_len


