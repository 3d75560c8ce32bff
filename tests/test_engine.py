"""
Engine tests. Two kinds of model:
- mocks (uniform or scripted logits) for sampling, tool-use, stopping and length rules;
- a tiny real GPT with every parameter randomised (so attention, smear, value embeddings and backout all
  matter), checked against naive full-recompute generation.
Both speak conftest's byte tokenizer (bytes are ids 0..255, the special tokens follow).
"""

import json
from dataclasses import dataclass

import pytest
import torch

from nanochat.chat_format import THINK_PREFILL
from nanochat.engine import Engine, KVCache, fit_conversation_to_context, sample_next_token
from nanochat.tools import calculator_tool, tool_call_json, web_search_budget
from nanochat.web_search import format_results


@dataclass
class MockConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 16


class MockModel:
    """Uniform logits (every token equally likely), or scripted: row b emits scripts[b][t] as its t-th
    generated token (a scripted position that a tool forces is simply skipped by the engine)."""

    def __init__(self, vocab_size, scripts=None, sequence_len=64, prompt_len=0):
        self.config = MockConfig(sequence_len=sequence_len, vocab_size=vocab_size)
        self.scripts = scripts
        self.prompt_len = prompt_len
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
        logits = torch.zeros(B, T, self.config.vocab_size)
        if self.scripts is not None:
            generated = pos + T - self.prompt_len  # index of the token the last position predicts
            for b in range(B):
                script = self.scripts[b % len(self.scripts)]
                logits[b, -1, script[min(generated, len(script) - 1)]] = 10.0
        return logits


@pytest.fixture(scope="module")
def prompt(byte_tokenizer):
    """The prompt of the mock-model tests: <|bos|>Hello."""
    return byte_tokenizer.encode("Hello", prepend="<|bos|>")


@pytest.fixture(scope="module")
def mock_model(byte_tokenizer, prompt):
    """make(scripts=None, sequence_len=64, prompt_len=len(prompt)) -> a MockModel over the byte tokenizer's ids."""
    def make(scripts=None, sequence_len=64, prompt_len=len(prompt)):
        return MockModel(byte_tokenizer.get_vocab_size(), scripts, sequence_len, prompt_len)
    return make


# -----------------------------------------------------------------------------
# sampling (logits over the byte tokenizer's vocabulary)

def test_kv_cache_is_reexported():
    from nanochat.kv_cache import KVCache as Original
    assert KVCache is Original


def test_sample_temperature_zero_is_argmax(byte_tokenizer):
    logits = torch.randn(5, byte_tokenizer.get_vocab_size(), generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        out = sample_next_token(logits, torch.Generator().manual_seed(seed), temperature=0.0)
        assert out.shape == (5, 1)
        assert torch.equal(out[:, 0], logits.argmax(dim=-1))


def test_top_k_restricts_support(byte_tokenizer):
    vocab_size = byte_tokenizer.get_vocab_size()
    logits = torch.randn(1, vocab_size, generator=torch.Generator().manual_seed(0)).expand(4000, -1)
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


def test_zero_probability_tokens_are_never_sampled(byte_tokenizer):
    # at a low temperature most of the vocabulary underflows to probability exactly 0
    logits = torch.linspace(-15, 15, byte_tokenizer.get_vocab_size()).flip(0).unsqueeze(0).expand(5000, -1)
    draws = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=0.05)[:, 0]
    probs = torch.softmax(logits[0] / 0.05, dim=-1)
    assert (probs[draws] > 0).all() and (probs == 0).any()


# -----------------------------------------------------------------------------
# engine with mock models

def first_columns(engine, prompt, **kw):
    return [column for column, _ in engine.generate(prompt, **kw)]


def test_multi_sample_first_tokens_are_independent(byte_tokenizer, prompt, mock_model):
    engine = Engine(mock_model(), byte_tokenizer)
    first = first_columns(engine, prompt, num_samples=16, max_tokens=1, temperature=1.0)[0]
    assert len(first) == 16 and len(set(first)) > 1  # identical would be (1/265)^15


def test_prefill_runs_once_at_batch_one(byte_tokenizer, prompt, mock_model):
    model = mock_model()
    Engine(model, byte_tokenizer).generate_batch(prompt, num_samples=4, max_tokens=3, temperature=0.0)
    assert model.calls[0] == (1, len(prompt))
    assert all(call == (4, 1) for call in model.calls[1:]) and len(model.calls) == 3


def test_decode_threads_apply_to_decode_steps_only(byte_tokenizer, prompt, mock_model):
    model = mock_model()
    torch.set_num_threads(2)  # conftest's fixture resets it for the next test
    try:
        seen_by_consumer = [torch.get_num_threads() for _ in Engine(model, byte_tokenizer, decode_threads=1).generate(
            prompt, max_tokens=4)]
        assert seen_by_consumer == [2] * 4
        assert model.threads == [2, 1, 1, 1]  # prefill keeps the process setting
        model.threads.clear()
        list(Engine(model, byte_tokenizer, decode_threads=None).generate(prompt, max_tokens=3))
        assert model.threads == [2, 2, 2]
    finally:
        torch.set_num_threads(1)


def test_same_seed_same_output_and_seeds_differ(byte_tokenizer, prompt, mock_model):
    engine = Engine(mock_model(), byte_tokenizer)
    outputs = set()
    for seed in (1, 42, 123, 999, 1000):
        r1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=8, seed=seed)
        r2, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=8, seed=seed)
        assert r1 == r2
        outputs.add(tuple(r1[0]))
    assert len(outputs) > 1


def test_temperature_zero_ignores_seed(byte_tokenizer, prompt, mock_model):
    engine = Engine(mock_model(scripts=[byte_tokenizer.encode("deterministic")]), byte_tokenizer)
    results = {tuple(engine.generate_batch(prompt, temperature=0.0, max_tokens=8, seed=s)[0][0]) for s in (1, 2, 3)}
    assert len(results) == 1
    assert list(results.pop()) == prompt + byte_tokenizer.encode("determin")


@pytest.mark.parametrize("max_tokens", [1, 4, 16])
def test_max_tokens_and_num_samples(byte_tokenizer, prompt, mock_model, max_tokens):
    engine = Engine(mock_model(scripts=[[ord("a")]]), byte_tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=max_tokens, temperature=0.0)
    assert len(results) == 3
    assert all(len(r) == len(prompt) + max_tokens for r in results)
    assert all(m == [0] * len(prompt) + [1] * max_tokens for m in masks)


def test_generation_never_exceeds_sequence_len(byte_tokenizer, prompt, mock_model):
    S = byte_tokenizer.special
    model = mock_model(scripts=[[ord("a")]], sequence_len=20)
    engine = Engine(model, byte_tokenizer)
    results, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=1000, temperature=0.0)
    assert all(len(r) == 20 for r in results)  # capped to the context, not an error
    results, _ = engine.generate_batch(prompt, max_tokens=None, temperature=0.0)
    assert len(results[0]) == 20
    assert engine.max_new_tokens(len(prompt), None) == 20 - len(prompt)
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([S["<|bos|>"]] + [ord("x")] * 19, max_tokens=5))


def test_rows_stop_on_assistant_end_and_bos(byte_tokenizer, prompt, mock_model):
    tok, S = byte_tokenizer, byte_tokenizer.special
    scripts = [tok.encode("hi") + [S["<|assistant_end|>"]],
               tok.encode("hello") + [S["<|bos|>"]],
               tok.encode("h") + [S["<|assistant_end|>"]]]  # the first token comes from the shared prompt
    model = mock_model(scripts=scripts)
    engine = Engine(model, tok)
    columns = first_columns(engine, prompt, num_samples=3, max_tokens=50, temperature=0.0)
    assert len(columns) == 6  # the longest row: "hello" + <|bos|>, then everything stops
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=50, temperature=0.0)
    assert [r[len(prompt):] for r in results] == [tok.encode("hi"), tok.encode("hello"), tok.encode("h")]
    assert all(len(m) == len(r) for m, r in zip(masks, results))


def tool_script(tok, code, after):
    """python_start code python_end, room for the forced output (skipped), then `after`."""
    return [tok.encode_special("<|python_start|>"), *tok.encode(code), tok.encode_special("<|python_end|>"), *after]


def test_calculator_output_is_forced_and_masked(byte_tokenizer, prompt, mock_model):
    tok, S = byte_tokenizer, byte_tokenizer.special
    after = tok.encode(" ok") + [S["<|assistant_end|>"]]
    result_text = calculator_tool("12/60")
    forced = [S["<|output_start|>"], *tok.encode(result_text), S["<|output_end|>"]]
    # the scripted model's positions for the forced tokens are placeholders ("?")
    script = tool_script(tok, "12/60", [ord("?")] * len(forced) + after)
    engine = Engine(mock_model(scripts=[script]), tok)
    results, masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    generated, gen_masks = results[0][len(prompt):], masks[0][len(prompt):]
    call = [S["<|python_start|>"], *tok.encode("12/60"), S["<|python_end|>"]]
    assert generated == call + forced + tok.encode(" ok")
    assert gen_masks == [1] * len(call) + [0] * len(forced) + [1] * 3
    assert result_text == "0.2"


def test_calculator_refusal_and_no_tools_force_nothing(byte_tokenizer, prompt, mock_model):
    tok = byte_tokenizer
    after = tok.encode("z") + [tok.encode_special("<|assistant_end|>")]
    for code, tools in (("__import__('os').system('x')", "calculator"), ("1+1", None)):
        script = tool_script(tok, code, after)
        results, masks = Engine(mock_model(scripts=[script]), tok, tools=tools).generate_batch(
            prompt, max_tokens=80, temperature=0.0)
        assert results[0][len(prompt):] == script[:-1]  # the model's own tokens only
        assert 0 not in masks[0][len(prompt):]


def test_tool_is_per_row(byte_tokenizer, prompt, mock_model):
    tok, S = byte_tokenizer, byte_tokenizer.special
    after = tok.encode("a") + [S["<|assistant_end|>"]]
    forced = [S["<|output_start|>"], *tok.encode("4"), S["<|output_end|>"]]
    scripts = [tool_script(tok, "2+2", [ord("?")] * len(forced) + after),
               [S["<|python_start|>"]] + tok.encode("plain") + [S["<|assistant_end|>"]]]  # never closes the block
    results, masks = Engine(mock_model(scripts=scripts), tok).generate_batch(prompt, num_samples=2, max_tokens=40,
                                                                             temperature=0.0)
    assert forced[1] in results[0] and masks[0].count(0) == len(prompt) + len(forced)
    assert results[1][len(prompt):] == [S["<|python_start|>"]] + tok.encode("plain")
    assert masks[1].count(0) == len(prompt)


def test_custom_tool_function(byte_tokenizer, prompt, mock_model):
    tok, S = byte_tokenizer, byte_tokenizer.special
    seen = []

    def tool(code):
        seen.append(code)
        return "RESULT"
    forced = [S["<|output_start|>"], *tok.encode("RESULT"), S["<|output_end|>"]]
    script = tool_script(tok, "search cats", [ord("?")] * len(forced) + [S["<|assistant_end|>"]])
    results, _ = Engine(mock_model(scripts=[script]), tok, tools=tool).generate_batch(prompt, max_tokens=40,
                                                                                      temperature=0.0)
    assert seen == ["search cats"] and results[0][-len(forced):] == forced


def test_finished_rows_do_not_run_tools(byte_tokenizer, prompt, mock_model):
    tok, S = byte_tokenizer, byte_tokenizer.special
    calls = []
    scripts = [tok.encode("a") + [S["<|assistant_end|>"]] + tool_script(tok, "1+1", tok.encode("zzzz")),
               tok.encode("abcdefghijklmnop") + [S["<|assistant_end|>"]]]
    engine = Engine(mock_model(scripts=scripts), tok, tools=lambda code: calls.append(code) or "2")
    results, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert calls == [] and results[0][len(prompt):] == tok.encode("a")


def test_unknown_tool_name_is_an_error(byte_tokenizer, mock_model):
    with pytest.raises(ValueError, match="unknown tool"):
        Engine(mock_model(), byte_tokenizer, tools="web")


def test_bad_prompt_is_an_error(byte_tokenizer, mock_model):
    engine = Engine(mock_model(), byte_tokenizer)
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

@pytest.fixture(scope="module")
def gpt(build_random_gpt):
    """conftest's random GPT: GQA, a window of 8 that the decode runs past, every parameter random."""
    return build_random_gpt()


def test_kv_cache_decode_logits_match_full_forward(gpt, random_prompt):
    tokens = random_prompt(40)
    with torch.inference_mode():
        full = gpt(torch.tensor([tokens]))
        cache = KVCache.for_model(gpt, 1, 64)
        chunks = [gpt(torch.tensor([tokens[:12]]), kv_cache=cache), gpt(torch.tensor([tokens[12:20]]), kv_cache=cache)]
        chunks += [gpt(torch.tensor([[t]]), kv_cache=cache) for t in tokens[20:]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_engine_greedy_matches_naive_generate(gpt, byte_tokenizer, random_prompt, num_samples):
    S = byte_tokenizer.special
    prompt = random_prompt(10, seed=1)
    naive = list(gpt.generate(prompt, max_tokens=30, temperature=0.0))
    engine = Engine(gpt, byte_tokenizer, tools=None)
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=30, temperature=0.0)
    stop = {S["<|assistant_end|>"], S["<|bos|>"]}
    expected = naive[:next((i for i, t in enumerate(naive) if t in stop), len(naive))]
    assert len(set(naive)) > 3  # a real, varied continuation
    for row in results:
        assert row == prompt + expected


def test_engine_samples_are_reproducible_and_diverse(gpt, byte_tokenizer, random_prompt):
    prompt = random_prompt(8, seed=2)
    engine = Engine(gpt, byte_tokenizer, tools=None)
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=5)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=5)
    assert a == b
    assert len({tuple(r) for r in a}) > 1


def test_engine_fills_the_context_exactly(gpt, byte_tokenizer, random_prompt):
    prompt = random_prompt(58, seed=3)
    engine = Engine(gpt, byte_tokenizer, tools=None)
    columns = [column for column, _ in engine.generate(prompt, num_samples=2, max_tokens=100, temperature=0.0)]
    assert len(prompt) + len(columns) == gpt.config.sequence_len


# -----------------------------------------------------------------------------
# think toggle, tools by name, the Engine's own web_search ("auto"/"force")

def chat_prompt(tok, *turns):
    """A rendered chat prompt (render_for_completion's layout) for user/assistant texts, alternating from user."""
    S = tok.special
    ids = [S["<|bos|>"]]
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        ids += [S[f"<|{role}_start|>"], *tok.encode(text), S[f"<|{role}_end|>"]]
    return ids + [S["<|assistant_start|>"]]


SEARCH_SEQ_LEN = 2048  # room for search results with long temporary paths in their urls


def run_scripted(tok, prompt, script, engine_kwargs=None, **generate_kwargs):
    """Generate greedily from a model that writes `script` (by position: forced positions are placeholders);
    returns the generated tokens and their masks."""
    model = MockModel(tok.get_vocab_size(), scripts=[script], sequence_len=SEARCH_SEQ_LEN, prompt_len=len(prompt))
    engine = Engine(model, tok, **(engine_kwargs or {}))
    results, masks = engine.generate_batch(prompt, temperature=0.0, **generate_kwargs)
    return results[0][len(prompt):], masks[0][len(prompt):], model


def output_tokens(tok, text):
    return [tok.encode_special("<|output_start|>"), *tok.encode(text), tok.encode_special("<|output_end|>")]


def call_tokens(tok, code):
    return [tok.encode_special("<|python_start|>"), *tok.encode(code), tok.encode_special("<|python_end|>")]


def search_output(tok, provider, query):
    """The forced output of a web_search for `query`: the provider's results as the Engine formats them."""
    k, max_chars = web_search_budget(SEARCH_SEQ_LEN)
    return output_tokens(tok, format_results(provider.search(query, k), max_chars))


@pytest.mark.parametrize("think, engine_default", [("on", None), ("off", None), (None, "on"), (None, "off")])
def test_think_toggle_prefills_forced_tokens(byte_tokenizer, prompt, mock_model, think, engine_default):
    tok, S = byte_tokenizer, byte_tokenizer.special
    mode = think or engine_default
    prefill = tok.encode(THINK_PREFILL[mode])
    answer = tok.encode("ok.") + [S["<|assistant_end|>"]]
    generated, masks, model = run_scripted(tok, prompt, [ord("?")] * len(prefill) + answer,
                                           engine_kwargs={"think_default": engine_default}, think=think)
    assert generated == prefill + tok.encode("ok.")
    assert masks == [0] * len(prefill) + [1] * 3
    assert model.calls[0] == (1, len(prompt) + len(prefill))  # the model reads the prefill as part of its prompt
    # nothing prefilled without a mode, and an explicit mode beats the Engine's default
    plain, _, _ = run_scripted(tok, prompt, answer)
    assert plain == tok.encode("ok.")
    other = "off" if mode == "on" else "on"
    flipped, _, _ = run_scripted(tok, prompt, [ord("?")] * len(tok.encode(THINK_PREFILL[other])) + answer,
                                 engine_kwargs={"think_default": mode}, think=other)
    assert flipped[:len(tok.encode(THINK_PREFILL[other]))] == tok.encode(THINK_PREFILL[other])
    with pytest.raises(ValueError, match="think must be"):
        Engine(mock_model(), tok, think_default="maybe")


@pytest.mark.parametrize("code, expected_output", [
    ("23*47", "1081"),                                                     # bare calculator expression
    (tool_call_json("calculator", expression="45 * 0.17"), "7.65"),       # JSON calculator
    (tool_call_json("web_search", query="weather in Oslo"), None),         # JSON web_search (a local provider)
    ('{"tool": "shell", "arguments": {"cmd": "ls"}}',
     "tool error: unknown tool 'shell' (available: calculator, web_search)"),
    ('{"tool": "web_search", "arguments": {"query": ', None),               # bad JSON
])
def test_engine_dispatches_tool_calls_by_name(byte_tokenizer, prompt, search_docs, code, expected_output):
    tok, S = byte_tokenizer, byte_tokenizer.special
    if expected_output is None and "query\": \"weather" in code:
        forced = search_output(tok, search_docs, "weather in Oslo")
        assert tok.decode(forced).startswith("[1] Weather in Oslo today")
    elif expected_output is None:
        with pytest.raises(json.JSONDecodeError) as error:  # what the JSON parser says is what the model reads
            json.loads(code.strip())
        forced = output_tokens(tok, f"tool error: bad JSON ({error.value.msg} at column {error.value.colno}); write "
                                    '{"tool": "name", "arguments": {...}}')
    else:
        forced = output_tokens(tok, expected_output)
    script = call_tokens(tok, code) + [ord("?")] * len(forced) + tok.encode(" done") + [S["<|assistant_end|>"]]
    generated, masks, _ = run_scripted(tok, prompt, script, engine_kwargs={
        "tools": ["calculator", "web_search"], "search_provider": search_docs})
    call = call_tokens(tok, code)
    assert generated == call + forced + tok.encode(" done")
    assert masks == [1] * len(call) + [0] * len(forced) + [1] * 5  # the tool's output is forced, never sampled


def test_tools_are_chosen_per_call(byte_tokenizer, prompt, mock_model, search_docs):
    tok = byte_tokenizer
    code = tool_call_json("web_search", query="tea price")
    engine = Engine(mock_model(scripts=[call_tokens(tok, code) + [ord("?")] * 300], sequence_len=512), tok,
                    search_provider=search_docs)  # the Engine's default tools: the calculator only

    def tool_output(**kwargs):
        result, masks = engine.generate_batch(prompt, max_tokens=len(call_tokens(tok, code)) + 90, temperature=0.0,
                                              **kwargs)
        return tok.decode([t for t, m in zip(result[0], masks[0]) if m == 0][len(prompt):])  # the forced tokens
    assert tool_output().startswith("tool error: unknown tool 'web_search' (available: calculator)")
    assert tool_output(tools=["web_search"]).startswith("[1] Tea price today")
    assert tool_output(tools="none") == ""


WEATHER = "What's the weather in Oslo today?"


@pytest.fixture(scope="module")
def injected(byte_tokenizer):
    """The web_search call the Engine injects for WEATHER."""
    return call_tokens(byte_tokenizer, tool_call_json("web_search", query=WEATHER))


def test_auto_search_is_injected_after_think_closes(byte_tokenizer, injected, search_docs):
    """think on: the model reasons, closes the block, and starts answering; the Engine replaces that first answer
    token by its web_search call, the results follow, then the model answers."""
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, WEATHER)
    prefill, think = tok.encode(THINK_PREFILL["on"]), tok.encode("weather changes, look it up.\n</think>\n")
    output = search_output(tok, search_docs, WEATHER)
    script = ([ord("?")] * len(prefill) + think + tok.encode("X") + [ord("?")] * (len(injected) + len(output) - 1)
              + tok.encode("Rain.") + [S["<|assistant_end|>"]])
    generated, masks, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, think="on",
                                       search="auto")
    assert generated == prefill + think + injected + output + tok.encode("Rain.")
    assert masks == [0] * len(prefill) + [1] * len(think) + [0] * (len(injected) + len(output)) + [1] * 5
    # "off" mode: the same question and no search
    plain, _, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, think="on")
    assert S["<|python_start|>"] not in plain


def test_auto_search_with_think_off_comes_first(byte_tokenizer, injected, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, WEATHER)
    prefill, output = tok.encode(THINK_PREFILL["off"]), search_output(tok, search_docs, WEATHER)
    script = [ord("?")] * (len(prefill) + len(injected) + len(output)) + tok.encode("Rain.") + [S["<|assistant_end|>"]]
    generated, _, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, think="off",
                                   search="auto")
    assert generated == prefill + injected + output + tok.encode("Rain.")


def test_the_model_searching_itself_is_not_searched_again(byte_tokenizer, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, WEATHER)
    own = call_tokens(tok, tool_call_json("web_search", query="Oslo weather"))
    output = search_output(tok, search_docs, "Oslo weather")
    script = own + [ord("?")] * len(output) + tok.encode("Rain.") + [S["<|assistant_end|>"]]
    generated, _, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, search="force")
    assert generated == own + output + tok.encode("Rain.")


def test_search_owed_after_another_tool_comes_after_its_output(byte_tokenizer, injected, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, WEATHER)
    calc, calc_out, output = call_tokens(tok, "2+2"), output_tokens(tok, "4"), search_output(tok, search_docs, WEATHER)
    script = (calc + [ord("?")] * (len(calc_out) + len(injected) + len(output)) + tok.encode("Rain.")
              + [S["<|assistant_end|>"]])
    generated, _, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, search="auto")
    assert generated == calc + calc_out + injected + output + tok.encode("Rain.")


def test_a_model_that_opens_think_itself_searches_after_it(byte_tokenizer, injected, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, WEATHER)
    think, output = tok.encode("<think>\nlook it up\n</think>\n"), search_output(tok, search_docs, WEATHER)
    script = think + [ord("?")] * (len(injected) + len(output)) + tok.encode("Rain.") + [S["<|assistant_end|>"]]
    generated, _, _ = run_scripted(tok, prompt, script, engine_kwargs={"search_provider": search_docs}, search="auto")
    assert generated == think + injected + output + tok.encode("Rain.")


def test_auto_asks_the_classifier_force_does_not(byte_tokenizer, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    question = "How do airplanes fly?"
    prompt = chat_prompt(tok, question)
    answer = tok.encode("Wings.") + [S["<|assistant_end|>"]]
    generated, _, _ = run_scripted(tok, prompt, answer, engine_kwargs={"search_provider": search_docs}, search="auto")
    assert generated == tok.encode("Wings.")
    forced = call_tokens(tok, tool_call_json("web_search", query=question))
    generated, _, _ = run_scripted(tok, prompt, answer + [ord("?")] * 300,
                                   engine_kwargs={"search_provider": search_docs}, search="force")
    assert generated[:len(forced)] == forced and S["<|output_start|>"] in generated


def test_follow_up_search_resolves_the_pronoun(byte_tokenizer, search_docs):
    tok, S = byte_tokenizer, byte_tokenizer.special
    prompt = chat_prompt(tok, "Who is the mayor of Oslo?", "Ingrid Berg.", "Tell me more about her.")
    generated, _, _ = run_scripted(tok, prompt, [ord("?")] * 300, engine_kwargs={"search_provider": search_docs},
                                   search="auto", max_tokens=150)
    call = tok.decode(generated[1:generated.index(S["<|python_end|>"])])
    assert call == tool_call_json("web_search", query="Tell me more about the mayor of Oslo.")


def test_search_modes_need_a_provider_and_a_known_mode(byte_tokenizer, mock_model):
    engine = Engine(mock_model(), byte_tokenizer)
    with pytest.raises(ValueError, match="search provider"):
        next(engine.generate(chat_prompt(byte_tokenizer, WEATHER), search="auto"))
    with pytest.raises(ValueError, match="search must be one of"):
        next(engine.generate(chat_prompt(byte_tokenizer, WEATHER), search="sometimes"))
