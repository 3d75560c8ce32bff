"""
Samples of a base model to look at: greedy continuations of a few fixed prompts (printed during pretraining
and by base_eval) and unconditional samples from a lone <|bos|>.
"""

import torch

from nanochat.engine import Engine

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts, max_tokens=16):
    """Greedy continuation of each prompt (BOS-prefixed), decoded with the prompt."""
    engine = Engine(model, tokenizer)
    seq_len = model.config.sequence_len
    max_tokens = min(max_tokens, seq_len // 2)
    texts = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend="<|bos|>")
        tokens = tokens[-(seq_len - max_tokens):]  # tiny-context models: keep the end of the prompt
        results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=0)
        texts.append(tokenizer.decode(results[0]))
    return texts


@torch.no_grad()
def unconditional_samples(model, tokenizer, num_samples=8, max_tokens=128, temperature=1.0, seed=42):
    """Samples from a lone BOS token."""
    tokens = [tokenizer.get_bos_token_id()]
    results, _ = Engine(model, tokenizer).generate_batch(tokens, num_samples=num_samples, max_tokens=max_tokens,
                                                         temperature=temperature, seed=seed)
    return [tokenizer.decode(ids) for ids in results]
