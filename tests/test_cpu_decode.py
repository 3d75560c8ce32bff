"""CPUDecoder (nanochat.cpu_decode): the one-token step restated over a snapshot of the weights must equal the
model's forward, and the Engine must never decode with weights older than the model's."""
import pytest
import torch

from nanochat.cpu_decode import CPUDecoder
from nanochat.engine import Engine
from nanochat.kv_cache import KVCache


def decode(model, prompt, steps, step_fn):
    """Prefill `prompt` (B, T0) with the model, then feed `steps` (B, n) one column at a time through step_fn."""
    kv = KVCache.for_model(model, prompt.size(0), prompt.size(1) + steps.size(1))
    with torch.inference_mode():
        model(prompt, kv_cache=kv)
        logits = [step_fn(steps[:, t:t + 1], kv) for t in range(steps.size(1))]
    return torch.cat(logits, dim=1), kv


def test_decoder_step_equals_the_model_forward(build_random_gpt):
    """Logits and the K/V written, step after step (windows shorter than the cache, GQA, value embeddings, smear,
    backout all on: every parameter of build_random_gpt's model is random)."""
    model = build_random_gpt(seed=3)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    steps = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))  # runs past the window of 8
    decoder = CPUDecoder(model)
    fast, fast_kv = decode(model, prompt, steps, decoder.step)
    slow, slow_kv = decode(model, prompt, steps, lambda idx, kv: model(idx, kv_cache=kv))
    assert fast_kv.get_pos() == slow_kv.get_pos() == 25
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_kv.k_cache, slow_kv.k_cache, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_kv.v_cache, slow_kv.v_cache, atol=1e-5, rtol=1e-5)
    assert fast.abs().max() > 1.0  # a random model gives non-trivial logits: the comparison has teeth


@pytest.mark.parametrize("chunks", [(17, 13), (1, 29)], ids=["past-the-window", "one-token-first"])
def test_decoder_prefill_equals_the_model_forward(build_random_gpt, chunks):
    """A prompt prefilled in two chunks (the first from position 0, the second continuing the smear state and
    attending to the cache through a window of 8), then decode steps: last logits and K/V equal the model's."""
    model = build_random_gpt(seed=3)
    ids = torch.randint(0, 256, (2, sum(chunks) + 4), generator=torch.Generator().manual_seed(6))
    decoder = CPUDecoder(model)
    results = []
    for prefill in (decoder.prefill, lambda idx, kv: model(idx, kv_cache=kv, last_logits_only=True)):
        kv = KVCache.for_model(model, 2, ids.size(1))
        with torch.inference_mode():
            first = prefill(ids[:, :chunks[0]], kv)
            second = prefill(ids[:, chunks[0]:sum(chunks)], kv)
            steps = [decoder.step(ids[:, t:t + 1], kv) for t in range(sum(chunks), ids.size(1))]
        results.append((torch.cat([first, second, *steps], dim=1), kv))
    (fast, fast_kv), (slow, slow_kv) = results
    assert fast.shape == (2, 6, model.config.vocab_size) and fast_kv.get_pos() == slow_kv.get_pos() == ids.size(1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_kv.k_cache, slow_kv.k_cache, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_kv.v_cache, slow_kv.v_cache, atol=1e-5, rtol=1e-5)
    assert fast.abs().max() > 1.0


def test_decoder_needs_a_prefilled_cache(build_random_gpt):
    model = build_random_gpt()
    with pytest.raises(ValueError, match="prefill"):
        CPUDecoder(model).step(torch.zeros(1, 1, dtype=torch.long), KVCache.for_model(model, 1, 4))


def greedy(engine, prompt, n=12):
    results, _ = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)
    return results[0]


def naive_greedy(model, tokenizer, prompt, n=12):
    out = list(model.generate(prompt, max_tokens=n, temperature=0.0))
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    return prompt + out[:next((i for i, t in enumerate(out) if t in stop), len(out))]


@pytest.mark.parametrize("announce", [True, False], ids=["weights_changed", "forgotten-call"])
def test_engine_follows_in_place_weight_changes(build_random_gpt, byte_tokenizer, random_prompt, announce):
    """After in-place updates the Engine decodes with the new weights: told so by weights_changed(), or, when the
    caller forgot, by the sampled check at the next generate."""
    model = build_random_gpt(seed=1)
    engine = Engine(model, byte_tokenizer, tools=None)
    prompt = random_prompt(6, seed=2)
    before = greedy(engine, prompt)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
        model.transformer.h[0].mlp.c_fc.weight.add_(0.3)
    if announce:
        engine.weights_changed()
    after = greedy(engine, prompt)
    assert after != before
    assert after == naive_greedy(model, byte_tokenizer, prompt)


def test_engine_follows_replaced_parameters_and_optimizer_steps(build_random_gpt, byte_tokenizer, random_prompt):
    """load_state_dict(assign=True) replaces the parameters; an optimizer step writes them in place (AdamW through
    torch's fused CPU kernel, which bumps no version counter): both must reach the decoder."""
    model = build_random_gpt(seed=1).train()
    engine = Engine(model, byte_tokenizer, tools=None)
    prompt = random_prompt(6, seed=3)
    greedy(engine, prompt)
    model.load_state_dict(build_random_gpt(seed=7).state_dict(), assign=True)
    model.eval()
    assert greedy(engine, prompt) == naive_greedy(model, byte_tokenizer, prompt)

    optimizer = model.setup_optimizer(unembedding_lr=0.5, embedding_lr=0.5, matrix_lr=0.5, scalar_lr=0.5)
    x = torch.tensor([random_prompt(16, seed=4)])
    model.train()
    model(x, x).backward()
    optimizer.step()
    model.eval()
    assert greedy(engine, prompt) == naive_greedy(model, byte_tokenizer, prompt)


def test_int8_decode_stays_close_to_exact_and_is_opt_in(build_random_gpt, byte_tokenizer, random_prompt):
    """quantize="int8" decodes with int8 weights: logits move a little (they must move: the int8 path really ran)
    but stay within a few percent of their range; bad settings are clear errors."""
    model = build_random_gpt()
    prompt = torch.tensor([random_prompt(10, seed=2)])
    steps = torch.tensor([random_prompt(21, seed=3)[1:]])
    exact, _ = decode(model, prompt, steps, CPUDecoder(model).step)
    int8, _ = decode(model, prompt, steps, CPUDecoder(model, quantize="int8").step)
    spread = exact.max() - exact.min()
    error = (int8 - exact).abs().max()
    assert 0 < error < 0.05 * spread, (error, spread)
    agree = (int8.argmax(-1) == exact.argmax(-1)).float().mean()  # top choices mostly survive quantization
    assert agree >= 0.8

    engine = Engine(model, byte_tokenizer, tools=None, quantize="int8")
    results, _ = engine.generate_batch(random_prompt(10, seed=1), num_samples=2, max_tokens=12, temperature=0.0)
    assert all(len(row) > 10 for row in results)
    first = engine._decoder
    engine.generate_batch(random_prompt(10, seed=1), max_tokens=4, temperature=0.0)
    assert engine._decoder is first  # quantized once while the weights stay the same
    with torch.inference_mode():  # prompts run at full precision: the first token's logits are the exact ones
        kv = KVCache.for_model(model, 1, prompt.size(1))
        torch.testing.assert_close(engine.step_fns()[0](prompt, kv_cache=kv), model(prompt, last_logits_only=True))
    with pytest.raises(ValueError, match="quantize"):
        Engine(model, byte_tokenizer, quantize="int4")
