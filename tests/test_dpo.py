"""DPO: dpo_loss against a plain re-statement of TRL's formulas (sigmoid, cDPO, ipo, hinge), ln 2 at the start,
sequence log-probs against a hand sum over completion tokens, pair files in both TRL forms with path:line errors,
pair batches (chosen then rejected, prompt-keeping truncation, dropped long prompts), and a few Adam steps on a
tiny GPT that make every margin positive."""
import copy
import json
import math

import pytest
import torch

from nanochat.common import COMPUTE_DTYPE
from nanochat.dpo import (build_pair_batch, dpo_loss, dpo_metrics, load_pairs_jsonl, model_token_logps,
                          normalize_pair, pair_logps, sequence_logps, token_logps_from_logits)
from nanochat.gpt import GPTConfig

# -----------------------------------------------------------------------------
# TRL's formulas, restated on plain floats (TRL's DPOTrainer; label smoothing on sigmoid as in TRL <= 0.28, ipo on
# per-token log-ratios as in TRL >= 0.29)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def trl_loss(pc, pr, rc, rr, beta, loss_type, eps=0.0, nc=1, nr=1):
    if loss_type == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * beta)) ** 2
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -log_sigmoid(beta * h) * (1 - eps) - log_sigmoid(-beta * h) * eps
    return max(0.0, 1 - beta * h)


def random_logps(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=gen, dtype=torch.float64) * 40 for _ in range(4)]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("hinge", 0.0),
                                           ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_loss_matches_trl_formulas(loss_type, eps, beta):
    pc, pr, rc, rr = random_logps(16, seed=int(beta * 100) + len(loss_type))
    nc, nr = torch.randint(1, 30, (16,)), torch.randint(1, 30, (16,))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                        label_smoothing=eps, chosen_lengths=nc, rejected_lengths=nr)
    expected = [trl_loss(*(t[i].item() for t in (pc, pr, rc, rr)), beta, loss_type, eps, nc[i].item(), nr[i].item())
                for i in range(16)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))


def test_ipo_equals_trl_028_form_on_averaged_logps():
    """TRL <= 0.28 divided the log-probs themselves by the completion length; the loss is the same."""
    pc, pr, rc, rr = random_logps(8, seed=3)
    nc, nr = torch.randint(1, 30, (8,)), torch.randint(1, 30, (8,))
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=nc, rejected_lengths=nr)
    averaged, _, _ = dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta=0.3, loss_type="ipo",
                              chosen_lengths=torch.ones(8), rejected_lengths=torch.ones(8))
    torch.testing.assert_close(ours, averaged)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_loss_is_ln2_and_rewards_zero_when_policy_is_reference(eps):
    pc, pr, _, _ = random_logps(5, seed=1)
    pc.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.detach(), pr, beta=0.1, label_smoothing=eps)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0
    assert not chosen_rewards.requires_grad and losses.requires_grad  # rewards are detached, the loss is not
    losses.sum().backward()
    assert (pc.grad < 0).all()  # descending the loss raises the chosen log-prob (minus (1 - 2 eps) beta / 2)


def test_dpo_loss_rejects_bad_settings():
    pc, pr, rc, rr = random_logps(2, seed=0)
    for kwargs, message in [(dict(loss_type="kto"), "loss_type must be one of"),
                            (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing is conservative DPO"),
                            (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
                            (dict(beta=0.0), "beta must be positive"),
                            (dict(loss_type="ipo"), "pass chosen_lengths and rejected_lengths")]:
        with pytest.raises(ValueError, match=message):
            dpo_loss(pc, pr, rc, rr, **kwargs)


def test_metrics_use_trl_names():
    losses, chosen, rejected = torch.tensor([0.5, 0.7, 0.6]), torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.1, 0.3, 0.0])
    metrics = dpo_metrics(losses, chosen, rejected, torch.tensor([-4.0, -6.0, -2.0]), torch.tensor([-5.0, -9.0, -1.0]))
    assert metrics == pytest.approx({"loss": 0.6, "rewards/chosen": 0.1 / 3, "rewards/rejected": 0.4 / 3,
                                     "rewards/accuracies": 1 / 3, "rewards/margins": -0.1, "logps/chosen": -4.0,
                                     "logps/rejected": -5.0})  # a tie is not a win (TRL's chosen > rejected)

# -----------------------------------------------------------------------------
# sequence log-probs


def masked_targets(seed, B=3, T=9, V=11):
    """Targets with a prompt (-1) at the start of each row, a completion, then padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (B, T), generator=gen)
    for b, (start, end) in enumerate([(2, 6), (0, 9), (4, 5)]):
        targets[b, :start] = -1
        targets[b, end:] = -1
    return targets


def test_sequence_logps_equal_a_hand_sum_over_completion_tokens():
    V = 11
    targets = masked_targets(0, V=V)
    logits = torch.randn(3, 9, V, generator=torch.Generator().manual_seed(1)) * 3
    token_logps = token_logps_from_logits(logits, targets)
    assert (token_logps[targets == -1] == 0).all()
    logps, lengths = sequence_logps(token_logps, targets)
    hand, counts = [], []
    for b in range(3):
        total, n = 0.0, 0
        for t in range(9):
            if targets[b, t] != -1:
                row = logits[b, t].double()
                total += (row[targets[b, t]] - math.log(sum(math.exp(x) for x in row.tolist()))).item()
                n += 1
        hand.append(total)
        counts.append(n)
    torch.testing.assert_close(logps, torch.tensor(hand, dtype=torch.float32))
    assert lengths.tolist() == counts == [4, 9, 1]
    averaged, _ = sequence_logps(token_logps_from_logits(logits, targets), targets, average=True)
    torch.testing.assert_close(averaged, torch.tensor([h / n for h, n in zip(hand, counts)], dtype=torch.float32))


def test_sequence_logps_ignore_prompt_and_padding_logits():
    targets = masked_targets(2)
    logits = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(3))
    before, _ = sequence_logps(token_logps_from_logits(logits, targets), targets)
    scrambled = logits.clone()
    scrambled[targets == -1] = torch.randn(int((targets == -1).sum()), 11) * 100
    after, _ = sequence_logps(token_logps_from_logits(scrambled, targets), targets)
    assert torch.equal(before, after)
    # whatever a caller's per-token tensor holds at unscored positions (inf, nan) stays out of the sum
    token_logps = token_logps_from_logits(logits, targets)
    token_logps[targets == -1] = float("nan")
    assert torch.equal(sequence_logps(token_logps, targets)[0], before)


@pytest.fixture
def tiny_gpt(build_gpt):
    """make(vocab_size, seed=0) -> a 2-layer GPT as init leaves it but for a random output layer (init's is near
    zero: the logits would have nothing to say), ready to train."""
    def make(vocab_size, seed=0):
        config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                           window_pattern="L")
        model = build_gpt(config, seed)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
        return model
    return make


def test_model_token_logps_match_the_logits_path_with_and_without_autograd(tiny_gpt):
    model = tiny_gpt(vocab_size=50)
    targets = masked_targets(4, T=9, V=50)
    inputs = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        from_logits = token_logps_from_logits(model(inputs), targets)
        chunked = model_token_logps(model, inputs, targets)  # no autograd: the model's chunked loss
    live = model_token_logps(model, inputs, targets)  # autograd: the full-logits path
    assert live.requires_grad
    tol = dict(atol=1e-5, rtol=1e-5) if COMPUTE_DTYPE == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(chunked, from_logits, **tol)
    torch.testing.assert_close(live.detach(), from_logits, **tol)
    assert (chunked[targets == -1] == 0).all() and (live[targets == -1] == 0).all()

# -----------------------------------------------------------------------------
# pair files


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_standard_and_conversational_pairs_load_to_the_same_pair(tmp_path):
    standard = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
    conversational = {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                      "chosen": [{"role": "assistant", "content": "4."}],
                      "rejected": [{"role": "assistant", "content": "5."}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [standard, "", conversational])
    pairs = load_pairs_jsonl(path)
    assert pairs[0] == pairs[1] == {"prompt": conversational["prompt"], "chosen": conversational["chosen"],
                                    "rejected": conversational["rejected"]}
    multi = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                          {"type": "python_output", "text": "4"},
                                                          {"type": "text", "text": "4."}]}],
             "rejected": "5."}
    assert normalize_pair(multi)["rejected"] == [{"role": "assistant", "content": "5."}]


def test_bad_pair_rows_fail_with_path_and_line(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    rows = [good, "{broken", {"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": 3, "rejected": "b"},
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
             "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "<think>b"}]},
            ["prompt", "chosen", "rejected"]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError) as info:
        load_pairs_jsonl(path)
    message = str(info.value)
    assert "8 bad pair row(s)" in message and f"{path}:1:" not in message
    for line, fragment in [(2, "invalid JSON"), (3, "missing 'rejected'"), (4, "'chosen' must be a string"),
                           (5, "'chosen' must be one assistant message"), (6, "'chosen' must be one assistant"),
                           (7, "prompt + chosen: message 2: role is 'assistant'"),
                           (8, "prompt + rejected: message 1 (assistant): unclosed <think>"),
                           (9, "expected an object with 'prompt'")]:
        assert f"{path}:{line}: {fragment}" in message, (line, message)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_pairs_jsonl(str(empty))

# -----------------------------------------------------------------------------
# pair batches and training


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def pair(prompt, chosen, rejected):
    return normalize_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def scored(tokenizer, targets_row):
    return tokenizer.decode([t for t in targets_row.tolist() if t != -1])


def test_pair_batch_is_chosen_then_rejected_scoring_only_completions(tokenizer, tiny_gpt):
    pairs = [pair("the cat", "sat on a mat", "ran far away from home"), pair("a big red sun", "in the sky", "the")]
    multi_turn = normalize_pair({"prompt": [{"role": "user", "content": "the cat"},
                                            {"role": "assistant", "content": "sat on a mat"},
                                            {"role": "user", "content": "and then"}],
                                 "chosen": "it ran", "rejected": "the dog"})
    inputs, targets, stats = build_pair_batch(tokenizer, pairs + [multi_turn], max_seq_len=64)
    assert stats == {"pairs": 3, "dropped_long_prompt": 0, "truncated": 0}
    model = tiny_gpt(tokenizer.get_vocab_size())
    with torch.no_grad():
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(model, inputs, targets)
        row_logps, _ = sequence_logps(model_token_logps(model, inputs, targets), targets)
    completion_tokens = [len(tokenizer.encode(p[side][0]["content"])) + 1  # + <|assistant_end|>
                         for side in ("chosen", "rejected") for p in pairs + [multi_turn]]
    assert chosen_lengths.tolist() + rejected_lengths.tolist() == completion_tokens
    assert torch.equal(torch.cat([chosen, rejected]), row_logps)
    assert inputs.shape == targets.shape and inputs.shape[0] == 6
    end = "<|assistant_end|>"
    assert [scored(tokenizer, row) for row in targets] == [
        "sat on a mat" + end, "in the sky" + end, "it ran" + end, "ran far away from home" + end, "the" + end,
        "the dog" + end]  # the earlier assistant turn of a multi-turn prompt is context, not scored
    for row, p in enumerate(pairs):  # each row is the prompt then the completion, padded at the end
        ids = tokenizer.render_for_completion(p["prompt"])
        assert inputs[row, :len(ids)].tolist() == ids
    bos = tokenizer.get_bos_token_id()
    assert (inputs[4, (targets[4] != -1).nonzero().max() + 1:] == bos).all()


def test_truncation_keeps_the_prompt_and_drops_pairs_whose_prompt_fills_the_context(tokenizer, tiny_words):
    short_prompt = pair("the cat", "sat on a mat and then it ran far away from home to see the sun", "ran")
    long_prompt = pair(" ".join(tiny_words * 3), "sat", "ran")
    prompt_len = len(tokenizer.render_for_completion(short_prompt["prompt"]))
    max_seq_len = prompt_len + 3
    inputs, targets, stats = build_pair_batch(tokenizer, [short_prompt, long_prompt], max_seq_len=max_seq_len)
    assert stats == {"pairs": 1, "dropped_long_prompt": 1, "truncated": 1}
    assert inputs.shape == (2, max_seq_len)
    assert inputs[0, :prompt_len].tolist() == tokenizer.render_for_completion(short_prompt["prompt"])
    full = tokenizer.render_conversation(short_prompt["prompt"] + short_prompt["chosen"], max_tokens=None)[0]
    assert targets[0].tolist() == [-1] * (prompt_len - 1) + full[prompt_len:prompt_len + 4]  # the first 4 tokens
    # the edge: a prompt of exactly max_seq_len tokens leaves one completion token to score; one more drops it
    longest = len(full) - 1  # the chosen row exactly fits: nothing is cut
    assert build_pair_batch(tokenizer, [short_prompt], max_seq_len=longest)[2]["truncated"] == 0
    assert build_pair_batch(tokenizer, [short_prompt], max_seq_len=longest - 1)[2]["truncated"] == 1
    _, t_edge, s_edge = build_pair_batch(tokenizer, [short_prompt], max_seq_len=prompt_len)
    assert s_edge["pairs"] == 1 and (t_edge != -1).sum(dim=1).tolist() == [1, 1]
    none_in, none_t, s_none = build_pair_batch(tokenizer, [short_prompt], max_seq_len=prompt_len - 1)
    assert s_none == {"pairs": 0, "dropped_long_prompt": 1, "truncated": 0} and none_in is None and none_t is None


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_a_few_adam_steps_make_every_margin_positive(tokenizer, tiny_gpt, loss_type):
    pairs = [pair("the cat", "sat on a mat", "ran far away"), pair("the big red", "sun in the sky", "cat sat"),
             pair("it ran", "far away from home", "the mat"), pair("to see", "the sun", "a cat and a mat")]
    inputs, targets, _ = build_pair_batch(tokenizer, pairs, max_seq_len=64)
    policy = tiny_gpt(tokenizer.get_vocab_size(), seed=1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        ref_chosen, ref_rejected, _, _ = pair_logps(reference, inputs, targets)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    beta = 0.5
    for step in range(12):
        chosen, rejected, n_chosen, n_rejected = pair_logps(policy, inputs, targets)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                                            loss_type=loss_type, chosen_lengths=n_chosen,
                                                            rejected_lengths=n_rejected)
        if step == 0 and loss_type == "sigmoid":
            torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(policy, inputs, targets)
    _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
    assert (chosen_rewards - rejected_rewards > 0).all(), metrics
    assert metrics["rewards/accuracies"] == 1.0
