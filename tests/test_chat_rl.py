"""RL (scripts/chat_rl, nanochat/rl): group-mean advantages, zero gradient from an all-equal group, the policy
gradient loss against a hand restatement from the logits, rollout masks, the pass@k estimator against brute force,
and whole runs on a tiny model: resume == uninterrupted (bit-identical), 2 gloo ranks == 1 rank."""
import itertools
import json
import os

import pytest
import torch

from nanochat.rl import group_advantages, pass_at_k, policy_gradient_loss, rollout_rows, sample_seed
from scripts import chat_rl
from tasks.common import GeneratedTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat and then it ran far away from home to see the big red sun in the sky".split()


class VowelTask(GeneratedTask):
    """A reward a random tiny model earns sometimes: the share of vowels in its completion (so the advantages are
    not all zero and RL moves the weights)."""

    def get_example(self, index):
        rng = self.example_rng(index)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "a e i o u"}]}

    def reward(self, conversation, completion):
        return sum(c in "aeiou" for c in completion) / max(1, len(completion))

    def evaluate(self, conversation, completion):
        return int(self.reward(conversation, completion) >= 0.2)


@pytest.fixture
def sft(_isolated_base_dir, build_tiny_checkpoint, tiny_tokenizer, monkeypatch):
    """A tiny random GPT saved as chatsft_checkpoints/d2 step 0 (and its tokenizer), and chat_rl on VowelTask."""
    build_tiny_checkpoint(str(_isolated_base_dir), tiny_tokenizer, 64, os.path.join("chatsft_checkpoints", "d2"), 0)
    monkeypatch.setattr(chat_rl, "build_tasks", lambda name, size, n: (VowelTask(size), VowelTask(n, split="test")))
    return _isolated_base_dir


TINY = ["--device-type", "cpu", "--train-size", "16", "--examples-per-step", "2", "--num-samples", "4",
        "--device-batch-size", "3", "--max-new-tokens", "6", "--eval-examples", "3", "--eval-samples", "2",
        "--init-lr-frac", "1.0", "--matrix-lr", "0.05", "--embedding-lr", "0.05", "--unembedding-lr", "0.05"]


def load_weights(base, tag, step):
    return torch.load(os.path.join(base, "chatrl_checkpoints", tag, f"model_{step:06d}.pt"), map_location="cpu")


# -----------------------------------------------------------------------------
# the math

def test_advantages_are_reward_minus_group_mean():
    advantages = group_advantages([1, 0, 0, 1, 0, 0, 0, 0])
    assert advantages.tolist() == [0.75, -0.25, -0.25, 0.75, -0.25, -0.25, -0.25, -0.25]
    assert group_advantages([1.0] * 5).abs().max() == 0 and group_advantages([0, 0]).abs().max() == 0
    assert group_advantages([0.5, 1.5]).tolist() == [-0.5, 0.5]  # no division by the std


def rollout(tokens_per_row, prompt_len, forced, vocab_size, seed):
    """Fake Engine output: rows of prompt + sampled tokens (different lengths), mask 0 on the prompt and on
    `forced` (row, position) tool tokens."""
    gen = torch.Generator().manual_seed(seed)
    results, masks = [], []
    for row, n in enumerate(tokens_per_row):
        ids = torch.randint(0, vocab_size, (prompt_len + n,), generator=gen).tolist()
        mask = [0] * prompt_len + [0 if (row, prompt_len + i) in forced else 1 for i in range(n)]
        results.append(ids)
        masks.append(mask)
    return results, masks


def test_rollout_rows_train_only_sampled_tokens():
    results, masks = rollout([3, 5, 0], prompt_len=4, forced={(1, 6), (1, 7)}, vocab_size=50, seed=0)
    inputs, targets = rollout_rows(results, masks, pad_id=7)
    assert inputs.shape == targets.shape == (3, 8)
    assert targets[0].tolist() == [-1, -1, -1] + results[0][4:] + [-1] * 2
    assert targets[1].tolist() == [-1, -1, -1, results[1][4], results[1][5], -1, -1, results[1][8]]
    assert (targets[2] == -1).all() and inputs[2, 3:].eq(7).all() and inputs[0, 6:].eq(7).all()
    assert inputs[1].tolist() == results[1][:-1]


def test_policy_gradient_loss_equals_a_hand_restatement_and_an_equal_group_gives_zero_gradient(build_tiny_gpt):
    model = build_tiny_gpt(32, 50, seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # init_weights zeroes it: give the logits something to say
    results, masks = rollout([6, 3, 5, 2], prompt_len=3, forced={(0, 5)}, vocab_size=50, seed=1)
    inputs, targets = rollout_rows(results, masks, pad_id=0)
    advantages = group_advantages([1, 0, 0, 1])
    loss = policy_gradient_loss(model, inputs, targets, advantages)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).double(), dim=-1)
    hand = 0.0
    for row in range(4):
        for t in range(targets.shape[1]):
            if targets[row, t] >= 0:
                hand -= advantages[row].item() * logp[row, t, targets[row, t]].item()
    assert loss.item() == pytest.approx(hand, rel=1e-4, abs=1e-5)
    loss.backward()
    assert any(p.grad.abs().max() > 0 for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    policy_gradient_loss(model, inputs, targets, group_advantages([0.3] * 4)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)


def test_pass_at_k_is_the_chance_that_k_of_the_samples_hold_a_correct_one():
    for n, c in [(8, 0), (8, 1), (8, 3), (5, 5), (6, 2)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_sample_seeds_differ_by_step_question_and_chunk():
    seeds = {sample_seed(step, index, chunk) for step in range(-1, 20) for index in range(50) for chunk in range(4)}
    assert len(seeds) == 21 * 50 * 4 and all(0 <= s < 2 ** 31 for s in seeds)

# -----------------------------------------------------------------------------
# whole runs


def test_resume_is_bit_identical_to_the_uninterrupted_run(sft, capsys):
    common = TINY + ["--num-iterations", "4", "--eval-every", "4"]
    straight = chat_rl.main(common + ["--output-tag", "straight"])
    out = capsys.readouterr().out
    assert "step 00004/00004 (100.00%)" in out and "reward:" in out and "pass@2" in out
    assert set(straight["pass_at"]) == {"pass@1", "pass@2"} and straight["first_pass_at"]
    chat_rl.main(common + ["--output-tag", "split", "--save-every", "2"])
    os.remove(os.path.join(sft, "chatrl_checkpoints", "split", "model_000004.pt"))
    resumed = chat_rl.main(common + ["--output-tag", "split", "--resume-from-step", "2"])
    a, b = load_weights(sft, "straight", 4), load_weights(sft, "split", 4)
    source = torch.load(os.path.join(sft, "chatsft_checkpoints", "d2", "model_000000.pt"))
    assert any(not torch.equal(a[k], source[k]) for k in a)  # the run did move the weights
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["pass_at"] == straight["pass_at"] and resumed["first_pass_at"] == straight["first_pass_at"]
    meta = json.load(open(os.path.join(sft, "chatrl_checkpoints", "split", "meta_000004.json")))
    assert meta["loop_state"]["step"] == 4 and meta["task"] == "GSM8K" and meta["source"]["kind"] == "sft"
    assert os.path.exists(os.path.join(sft, "chatrl_checkpoints", "split", "optim_000004_rank0.pt"))
    assert os.path.exists(os.path.join(sft, "report", "chat-rl.md"))


DIST_DRIVER = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
from test_chat_rl import VowelTask  # this test's own task, not a helper of another test file
from scripts import chat_rl
chat_rl.build_tasks = lambda name, size, n: (VowelTask(size), VowelTask(n, split="test"))
result = chat_rl.main(json.loads(sys.argv[1]))
if os.environ["RANK"] == "0":
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
"""


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank(sft, tmp_path, torchrun_two_ranks):
    """--examples-per-step 2: one rank samples both questions, or each of two ranks one; the samples are seeded
    by (step, question, chunk) and the loss is normalized over the whole step's tokens. With one micro-batch per
    question, the mean over ranks of (2 x a question's gradient) is the single rank's sum with no other rounding:
    the weights are bit-equal."""
    common = TINY + ["--num-iterations", "3", "--eval-every", "3", "--device-batch-size", "4"]
    single = chat_rl.main(common + ["--output-tag", "one"])
    out = tmp_path / "result.json"
    torchrun_two_ranks(DIST_DRIVER, json.dumps(common + ["--output-tag", "two"]), out, REPO)
    double = json.load(open(out))
    a, b = load_weights(sft, "one", 3), load_weights(sft, "two", 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert {int(k): v for k, v in double["rewards"].items()} == single["rewards"]  # the same samples
    assert double["pass_at"] == pytest.approx(single["pass_at"])
    assert os.path.exists(os.path.join(sft, "chatrl_checkpoints", "two", "optim_000003_rank1.pt"))
