"""Continuous batching: rows at different positions in one RaggedKVCache must decode exactly as each sequence
would alone (model forward and CPU decoder), and the Scheduler's batched greedy answers equal solo answers."""
import pytest
import torch

from nanochat.cpu_decode import CPUDecoder
from nanochat.kv_cache import KVCache, RaggedKVCache


def prefill_alone(model, tokens, seq_len):
    cache = KVCache.for_model(model, 1, seq_len)
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), kv_cache=cache)[:, -1]
    return cache, logits


def solo_continuation(model, tokens, steps, seq_len):
    """Logits of feeding `steps` one at a time after `tokens`, at batch 1 with an ordinary cache."""
    cache, _ = prefill_alone(model, tokens, seq_len)
    out = []
    with torch.inference_mode():
        for t in steps:
            out.append(model(torch.tensor([[t]]), kv_cache=cache)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("use_decoder", [False, True], ids=["model", "cpu_decoder"])
def test_ragged_rows_decode_like_each_row_alone(tiny_gpt_factory, use_decoder):
    """Three prompts of different lengths (past the window of 8) decode together; each row's logits equal its
    solo decode, also after rows are swapped (as the scheduler compacts them) and a row leaves the batch."""
    model = tiny_gpt_factory(seed=1)
    seq_len = 64
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 30)]
    steps = torch.randint(0, 256, (3, 12), generator=gen).tolist()
    expected = [solo_continuation(model, p, s, seq_len) for p, s in zip(prompts, steps)]

    cache = RaggedKVCache.for_model(model, max_rows=4, seq_len=seq_len)
    for row, prompt in enumerate(prompts):
        cache.insert(row + 1, prefill_alone(model, prompt, seq_len)[0])   # rows 1..3; row 0 stays free
    order = [None, 0, 1, 2]  # cache row -> which sequence
    cache.swap_rows(0, 3)
    order[0], order[3] = order[3], order[0]
    cache.active = 3
    step_fn = CPUDecoder(model).step if use_decoder else (lambda idx, kv: model(idx, kv_cache=kv))
    got = [[] for _ in prompts]
    with torch.inference_mode():
        for t in range(12):
            if t == 6:  # sequence in row 1 leaves: swap it past the active block
                cache.swap_rows(1, cache.active - 1)
                order[1], order[cache.active - 1] = order[cache.active - 1], order[1]
                cache.active -= 1
            ids = torch.tensor([[steps[order[r]][t]] for r in range(cache.active)])
            logits = step_fn(ids, cache)[:, -1]
            for r in range(cache.active):
                got[order[r]].append(logits[r])
    for i, logits in enumerate(got):
        torch.testing.assert_close(torch.stack(logits), expected[i][:len(logits)], atol=1e-4, rtol=1e-4)
    assert [len(g) for g in got].count(6) == 1  # one row really left halfway
