"""
Reinforcement learning with a task's reward: nanochat's simplified GRPO (on-policy REINFORCE with the group
mean as baseline), as scripts/chat_rl.py runs it.

- rollouts: a question's `num_samples` completions, sampled through the Engine (tools run, their output forced);
- advantage = reward - mean reward of the question's samples (no division by the std: a question every sample
  gets right, or wrong, teaches nothing and gets exactly zero weight);
- loss = sum over sampled tokens of -advantage * log p(token), divided by the number of sampled tokens in the
  whole step (token-level normalization, as DAPO): the prompt, tool outputs forced by the engine, padding and the
  terminal <|assistant_end|> are not trained. No KL term, no reference model, no ratio or clipping: one gradient
  step per batch of fresh samples.
- pass@k on held-out problems with the unbiased estimator of the Codex paper (Chen et al. 2021).
"""

import math

import torch


def group_advantages(rewards):
    """Rewards of one question's samples (n,) -> advantages (n,): reward - the group's mean reward."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return rewards - rewards.mean()


def sample_seed(step, index, chunk):
    """The sampling seed of one chunk of a question's samples: a function of the step, the question's index in
    the task and the chunk only, so the samples never depend on the rank that draws them or on a resume."""
    return (step * 1_000_003 + index * 1009 + chunk) % (2 ** 31)


def rollout_rows(results, masks, pad_id, device="cpu"):
    """Engine.generate_batch output (per sample: prompt + generated ids, the terminal token excluded; masks with 0
    for the prompt and forced tool tokens) -> (inputs, targets), (rows, T): targets are -1 wherever the token was
    not sampled by the model (prompt, forced tool output, right padding)."""
    width = max(len(ids) for ids in results) - 1
    inputs = torch.full((len(results), width), pad_id, dtype=torch.long)
    targets = torch.full((len(results), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(results, masks)):
        n = len(ids) - 1
        if n <= 0:
            continue
        ids_t = torch.tensor(ids, dtype=torch.long)
        sampled = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[row, :n] = ids_t[:-1]
        targets[row, :n] = ids_t[1:].masked_fill(~sampled, -1)
    return inputs.to(device), targets.to(device)


def policy_gradient_loss(model, inputs, targets, advantages):
    """sum over the sampled tokens of -advantage * log p(token) for a batch of rows (one advantage per row); the
    caller scales it by world_size / (sampled tokens in the step) (nanochat.training.step_loss_scale)."""
    nll = model(inputs, targets, loss_reduction="none").view(targets.shape)  # -log p, 0 where target is -1
    return (nll * advantages.to(nll.dtype).unsqueeze(1)).sum()


def pass_at_k(num_samples, num_correct, k):
    """Unbiased estimate of the chance that at least one of k samples is correct, from num_samples samples of
    which num_correct were: 1 - C(n - c, k) / C(n, k). Lower variance than looking at the first k samples."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
