"""
Loss-based evaluation of a base model: bits per byte.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Bits per byte over `steps` batches: the summed cross-entropy (nats) of every target token divided by
    ln(2) x the number of bytes those target tokens stand for. Unlike the mean loss this does not depend on
    the vocabulary, so models with different tokenizers compare apples to apples.

    - token_bytes: 1-D tensor (vocab_size,), bytes per token id; 0 for tokens that must not count (specials
      like <|bos|>), whose loss is then excluded from the sum too.
    - targets < 0 (ignore_index -1) count neither nats nor bytes (and are never used as an index).
    - batches yields (inputs, targets) or (inputs, targets, loader_state).
    Sums are all-reduced across ranks, so every rank returns the same number.
    """
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)[:2]
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0)
        counted = num_bytes > 0
        # where(), not multiply: an ignored position may carry a nan/inf loss and 0*inf is nan
        total_nats += torch.where(counted, loss.to(acc_dtype), 0).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        raise ValueError("evaluate_bpb saw no countable target bytes (all targets ignored or special tokens); "
                         "evaluate on more tokens or check token_bytes.")
    return total_nats / (math.log(2) * total_bytes)
