"""
Direct Preference Optimization: the loss, sequence log-probs, preference-pair files and pair batches.

Semantics follow TRL's DPOTrainer:
- a completion's log-prob is the sum of its tokens' log-probs; prompt and padding tokens are not counted.
- dpo_loss: `sigmoid` (DPO; label_smoothing > 0 is conservative DPO, cDPO), `ipo`, `hinge`;
  rewards = beta * (policy - reference) log-prob, detached.
- `ipo` is computed on per-token averages of the log-ratios, as TRL >= 0.29 does (checked against TRL
  1.10.0.dev0): the loss uses (policy - reference) / completion length for each side, while the rewards (and the
  logps metrics) stay on the summed log-probs. TRL <= 0.28 averaged the log-probs themselves for ipo: the same loss,
  but its rewards/logps metrics were per-token averages.
- label smoothing on `sigmoid` is cDPO as in TRL <= 0.28 (TRL >= 0.29 kept it only for its `robust`/`exo_pair`
  losses); 0 gives plain DPO, the same in every TRL version.

Batches put the chosen rows first, then the rejected rows (one forward for both), as TRL does.

Pair files (JSONL), one pair per line, in either of TRL's forms (mixing them is fine):
    standard:        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
    conversational:  {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                      "chosen": [{"role": "assistant", "content": "4."}],
                      "rejected": [{"role": "assistant", "content": "5."}]}
A conversational prompt may hold a system message and earlier turns (it must end with the user); chosen and
rejected are one assistant message each, whose content may be a list of parts (nanochat.chat_format).
"""

import torch
import torch.nn.functional as F

from nanochat.chat_format import validate_conversation
from nanochat.fileio import load_jsonl

LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO losses -> (losses, chosen_rewards, rejected_rewards), each of shape (pairs,).

    The log-probs are summed over each completion's tokens (sequence_logps). `ipo` also needs chosen_lengths and
    rejected_lengths, the completion token counts, to average the log-ratios per token. label_smoothing (cDPO's
    epsilon, the assumed chance that a label is flipped) applies to `sigmoid` only.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is conservative DPO, a `sigmoid` loss option; it has no meaning for "
                         f"{loss_type!r}: set it to 0")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps

    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo averages the log-ratios per completion token: pass chosen_lengths and "
                             "rejected_lengths (see sequence_logps)")
        delta = (chosen_logratios / chosen_lengths.clamp(min=1)) - (rejected_logratios / rejected_lengths.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2  # eq. 17 of the IPO paper, beta playing tau
    else:
        delta = chosen_logratios - rejected_logratios
        if loss_type == "sigmoid":
            losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                      - F.logsigmoid(-beta * delta) * label_smoothing)
        else:  # hinge (the RSO paper's)
            losses = torch.relu(1 - beta * delta)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metric_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """TRL's logged metrics as sums over the pairs given, plus "pairs": add these up over micro-batches and ranks,
    then divide by the pairs (mean_dpo_metrics)."""
    return {
        "loss": losses.detach().sum().item(),
        "rewards/chosen": chosen_rewards.sum().item(),
        "rewards/rejected": rejected_rewards.sum().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).sum().item(),  # a tie is not a win
        "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
        "logps/chosen": chosen_logps.detach().sum().item(),
        "logps/rejected": rejected_logps.detach().sum().item(),
        "pairs": len(losses),
    }


def mean_dpo_metrics(sums):
    """dpo_metric_sums (summed over batches) -> TRL's metrics, the means over the pairs."""
    pairs = max(1, sums["pairs"])
    return {name: value / pairs for name, value in sums.items() if name != "pairs"}


def dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """TRL's logged metrics (means over the pairs given) as floats."""
    return mean_dpo_metrics(dpo_metric_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps))

# -----------------------------------------------------------------------------
# log-probs. Rows are (inputs, targets) with targets -1 wherever a token is not scored (prompt, tool output,
# padding), as in SFT.


def token_logps_from_logits(logits, targets):
    """(B, T, V) logits, (B, T) targets -> (B, T) log-prob of each target, 0 where the target is -1.
    logsumexp + gather instead of a full log_softmax: no second (B, T, V) tensor."""
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(targets == -1, 0.0)


def model_token_logps(model, inputs, targets):
    """(B, T) log-prob of each target under a nanochat GPT, 0 where the target is -1, from the model's own
    per-token cross-entropy (on CPU without autograd it never holds the (B, T, V) logits)."""
    return -model(inputs, targets, loss_reduction="none").view(targets.shape)


def sequence_logps(token_logps, targets, average=False):
    """Per-row log-prob of the scored tokens -> (logps, lengths), both (B,). Positions whose target is -1 are
    left out whatever token_logps holds there. average=True divides by the number of scored tokens (TRL's
    average_log_prob; an empty row gives 0)."""
    scored = targets != -1
    lengths = scored.sum(dim=-1)
    logps = torch.where(scored, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    if average:
        logps = logps / lengths.clamp(min=1)
    return logps, lengths


def pair_logps(model, inputs, targets):
    """One forward over a pair batch (chosen rows, then rejected rows) ->
    (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), log-probs summed per completion."""
    logps, lengths = sequence_logps(model_token_logps(model, inputs, targets), targets)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return chosen_logps, rejected_logps, chosen_lengths, rejected_lengths

# -----------------------------------------------------------------------------
# pair files


def _as_messages(value, role, field):
    """A field of a pair -> a list of messages; a string is one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field!r} must be a string or a non-empty list of messages, got {type(value).__name__}")
    return value


def normalize_pair(row):
    """A pair row in TRL's standard or conversational form -> {"prompt": [messages], "chosen": [assistant
    message], "rejected": [assistant message]}. Raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with 'prompt', 'chosen' and 'rejected', got {type(row).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)} (a pair needs 'prompt', 'chosen' and "
                         f"'rejected'; put the prompt in its own field, not inside chosen/rejected)")
    pair = {"prompt": _as_messages(row["prompt"], "user", "prompt")}
    for side in ("chosen", "rejected"):
        completion = _as_messages(row[side], "assistant", side)
        if len(completion) != 1 or not isinstance(completion[0], dict) or completion[0].get("role") != "assistant":
            raise ValueError(f"{side!r} must be one assistant message (a string, or [{{'role': 'assistant', "
                             f"'content': ...}}])")
        problems = validate_conversation(pair["prompt"] + completion, for_training=True)
        if problems:
            raise ValueError(f"prompt + {side}: " + "; ".join(problems))
        pair[side] = completion
    return pair


def prompt_and_answer(row):
    """A row of reference answers -> (prompt messages, [assistant message]): a conversation (a list of messages or
    {"messages": [...]}) whose last message is the assistant's answer, or a pair-style row with "prompt" and
    "chosen" (a "rejected" there is ignored). Raises ValueError saying what is wrong."""
    if isinstance(row, dict) and "prompt" in row:
        pair = normalize_pair({**row, "rejected": row.get("chosen", "")})
        return pair["prompt"], pair["chosen"]
    messages = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected a conversation (a list of messages or {\"messages\": [...]}) or an object with "
                         "'prompt' and 'chosen'")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError("the conversation must end with the assistant's reference answer")
    pair = normalize_pair({"prompt": messages[:-1], "chosen": messages[-1:], "rejected": messages[-1:]})
    return pair["prompt"], pair["chosen"]


def load_pairs_jsonl(path):
    """Read a JSONL file of preference pairs -> list of normalized pairs (normalize_pair). Every bad row is
    reported as path:LINE: reason, all in one ValueError."""
    pairs, errors = load_jsonl(path, normalize_pair)
    if errors:
        raise ValueError(f"{path}: {len(errors)} bad pair row(s); fix them:\n" + "\n".join(errors))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs found (the file is empty)")
    return pairs

# -----------------------------------------------------------------------------
# pair batches


def render_pair(tokenizer, pair, max_seq_len):
    """Tokenize a normalized pair -> (chosen, rejected, truncated): chosen and rejected are (ids, mask) cut to
    max_seq_len + 1 tokens (the model sees max_seq_len inputs), mask 1 marking the completion's scored tokens
    only (the prompt's earlier assistant turns are context here, not scored); truncated says a completion was
    cut. Truncation keeps the start, so the prompt is never cut while any completion token fits. Returns None
    when no completion token is left to score (the prompt alone fills the context)."""
    prompt_len = len(tokenizer.render_for_completion(pair["prompt"]))  # through <|assistant_start|>
    rows, truncated = [], False
    for side in ("chosen", "rejected"):
        ids, mask = tokenizer.render_conversation(pair["prompt"] + pair[side], max_tokens=None)
        truncated |= len(ids) > max_seq_len + 1
        ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
        mask = [0] * min(prompt_len, len(mask)) + mask[prompt_len:]
        if not any(mask):
            return None
        rows.append((ids, mask))
    return rows[0], rows[1], truncated


def collate_pairs(rendered, pad_id, device="cpu"):
    """Rendered pairs (render_pair's results) -> (inputs, targets), each (2 * pairs, T): all chosen rows, then
    all rejected rows, padded on the right to the longest (inputs with pad_id, targets with -1); targets are -1
    where the mask is 0."""
    rows = [r[0] for r in rendered] + [r[1] for r in rendered]
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        inputs[i, :n] = ids_t[:-1]
        targets[i, :n] = ids_t[1:].masked_fill(~mask_t[1:], -1)
    return inputs.to(device), targets.to(device)


def build_pair_batch(tokenizer, pairs, max_seq_len, device="cpu"):
    """Normalized pairs -> (inputs, targets, stats): one batch of chosen rows then rejected rows (collate_pairs)
    and stats {"pairs": kept, "dropped_long_prompt": pairs whose prompt fills the context, "truncated": kept pairs
    with a completion cut short}. With every pair dropped, inputs and targets are None."""
    rendered = [render_pair(tokenizer, pair, max_seq_len) for pair in pairs]
    kept = [r for r in rendered if r is not None]
    stats = {"pairs": len(kept), "dropped_long_prompt": len(rendered) - len(kept),
             "truncated": sum(r[2] for r in kept)}
    if not kept:
        return None, None, stats
    inputs, targets = collate_pairs(kept, tokenizer.get_bos_token_id(), device)
    return inputs, targets, stats
