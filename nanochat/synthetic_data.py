"""
Random-token batches in place of text, for benchmarks and tests (base_train --synthetic-data, bench_train): no
tokenizer data or corpus needed, and every world size sees the same global batches.
"""

import torch


def synthetic_loader(vocab_size, B, T, device, rank, world_size, seed_offset=0, resume_state_dict=None):
    """Global micro-batch g goes to rank g % world_size, so any world size (with the matching grad accumulation)
    sees the same global batches. Yields (x, y, state) like the real loader; the state names rank 0's batch,
    from which every rank can resume."""
    g = rank
    if isinstance(resume_state_dict, (list, tuple)):  # every rank's state: they all name the same global batch
        resume_state_dict = resume_state_dict[0]
    if resume_state_dict is not None:
        g = resume_state_dict["synthetic_batch"] + world_size + rank
    while True:
        gen = torch.Generator().manual_seed(seed_offset + g)
        tokens = torch.randint(0, vocab_size, (B, T + 1), generator=gen)
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        yield x, y, {"synthetic_batch": g - rank}
        g += world_size
