"""chat_dpo end to end on a tiny model: a few steps on fixed pairs make the validation margins positive (ln 2 and
zero rewards at step 0), the last stdout line is the final validation metrics as JSON under TRL's names,
--precompute-ref trains like the frozen copy, resume == uninterrupted (bit-identical), 2 gloo ranks == 1 rank,
malformed pair files stop the run with file:line, and the result loads as load_model("dpo")."""
import json
import math
import os

import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.cli import exit_on_user_error
from nanochat.tokenizer import RustBPETokenizer
from nanochat.training import NonFiniteLossError
from scripts import chat_cli, chat_dpo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("the cat", "sat on a mat", "ran far away"), ("the big red", "sun in the sky", "cat sat"),
         ("it ran", "far away from home", "the mat"), ("to see", "the sun", "a cat and a mat"),
         ("a mat", "and then it ran", "sky sky sky"), ("the sun", "in the big sky", "on a cat"),
         ("far away", "from home", "the the the"), ("see the", "big red sun", "mat ran")]
TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


@pytest.fixture
def sft(_isolated_base_dir, build_tiny_checkpoint, tiny_words):
    """A tiny random GPT as chatsft_checkpoints/d2 step 0, and a file of the 8 fixed pairs."""
    # a tokenizer of the pairs' own words, so a few steps can separate chosen from rejected
    texts = [" ".join(tiny_words[i:] + tiny_words[:i]) for i in range(len(tiny_words))] * 10
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), 300)
    build_tiny_checkpoint(str(_isolated_base_dir), tokenizer, 64, os.path.join("chatsft_checkpoints", "d2"), 0)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    rows[1] = {"prompt": [{"role": "user", "content": PAIRS[1][0]}],  # the conversational form, mixed in
               "chosen": [{"role": "assistant", "content": PAIRS[1][1]}],
               "rejected": [{"role": "assistant", "content": PAIRS[1][2]}]}
    (_isolated_base_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _isolated_base_dir


def tiny_args(base, *extra):
    return ["--device-type", "cpu", "--train-jsonl", str(base / "pairs.jsonl"), "--pairs-per-step", "4",
            "--device-batch-size", "2", "--init-lr-frac", "1.0", "--matrix-lr", "0.005", "--embedding-lr", "0.01",
            "--unembedding-lr", "0.005", "--beta", "0.5", *extra]


def load_weights(base, tag, step):
    return torch.load(os.path.join(base, "chatdpo_checkpoints", tag, f"model_{step:06d}.pt"), map_location="cpu")


def test_a_few_steps_make_margins_positive_and_the_last_line_is_the_final_metrics(sft, capsys):
    result = chat_dpo.main(tiny_args(sft, "--num-iterations", "8", "--eval-every", "4"))
    lines = capsys.readouterr().out.strip().splitlines()
    final = json.loads(lines[-1])
    assert set(final) == TRL_NAMES | {"step", "epoch"} and final["step"] == 8 and final["epoch"] == 4.0
    assert final["rewards/margins"] > 0 and final["rewards/accuracies"] == 1.0 and final["loss"] < math.log(2)
    first = result["first_val_metrics"]  # policy == reference at step 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/accuracies"] == 0.0
    assert first["rewards/margins"] == 0.0
    assert any(line.startswith("step 00008/00008") and "acc:" in line for line in lines)
    assert os.path.exists(os.path.join(sft, "report", "chat-dpo.md"))
    model, _, meta = load_model("dpo", "cpu", "eval")
    assert meta["step"] == 8 and meta["source"]["kind"] == "sft"
    chat_cli.main(["-i", "dpo", "-p", "the cat", "-t", "0", "--device-type", "cpu"])  # -i dpo just works


def test_precomputed_reference_trains_like_the_frozen_copy(sft, capsys):
    live = chat_dpo.main(tiny_args(sft, "--num-iterations", "4", "--output-tag", "live"))
    pre = chat_dpo.main(tiny_args(sft, "--num-iterations", "4", "--output-tag", "pre", "--precompute-ref"))
    assert "Reference log-probs of 16 pairs precomputed" in capsys.readouterr().out
    for name in TRL_NAMES:  # the same numbers, up to the rounding of a differently padded batch
        assert pre[name] == pytest.approx(live[name], rel=1e-4, abs=1e-5), name
    a, b = load_weights(sft, "live", 4), load_weights(sft, "pre", 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_is_bit_identical_to_the_uninterrupted_run(sft):
    common = tiny_args(sft, "--num-iterations", "5", "--eval-every", "-1")  # 5 steps of 4: crosses epochs
    straight = chat_dpo.main(common + ["--output-tag", "straight"])
    chat_dpo.main(common + ["--output-tag", "split", "--save-every", "3"])
    os.remove(os.path.join(sft, "chatdpo_checkpoints", "split", "model_000005.pt"))
    for precompute in ([], ["--precompute-ref"]):  # the reference is the source's weights, not the resumed ones
        resumed = chat_dpo.main(common + ["--output-tag", "split", "--resume-from-step", "3", *precompute])
        a, b = load_weights(sft, "straight", 5), load_weights(sft, "split", 5)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        if not precompute:
            assert {k: resumed[k] for k in TRL_NAMES} == {k: straight[k] for k in TRL_NAMES}


def test_malformed_pair_files_fail_with_file_and_line(sft, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{oops\n"
                   + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(SystemExit) as info:  # as `python -m scripts.chat_dpo` runs it: one line, exit 2
        exit_on_user_error(lambda: chat_dpo.main(tiny_args(sft, "--val-jsonl", str(bad))))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err and f"{bad}:3: missing 'rejected'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(lambda: chat_dpo.main(["--device-type", "cpu"]))
    assert info.value.code == 2 and "--train-jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank(sft, tmp_path, torchrun_two_ranks):
    """--pairs-per-step 4, 2 pairs per forward: one rank x 2 micro-steps or two ranks x 1, the same update."""
    common = tiny_args(sft, "--num-iterations", "3", "--eval-every", "-1")
    single = chat_dpo.main(common + ["--output-tag", "one"])
    out = tmp_path / "result.json"
    torchrun_two_ranks(torchrun_two_ranks.MAIN_DRIVER, "scripts.chat_dpo", json.dumps(common + ["--output-tag", "two"]), out)
    double = json.load(open(out))
    # each rank's block of pairs is one of the single rank's micro-batches (same padding, same forward), and the
    # mean over ranks of (2 x a micro-batch's gradient) is the single rank's sum, with no other rounding: the weights
    # are bit-equal; the metrics are sums added up in another order
    for name in TRL_NAMES:
        assert double[name] == pytest.approx(single[name], rel=1e-6), name
    a, b = load_weights(sft, "one", 3), load_weights(sft, "two", 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert os.path.exists(os.path.join(sft, "chatdpo_checkpoints", "two", "optim_000003_rank1.pt"))


def test_push_to_uploads_the_checkpoint_and_a_nan_stops_the_run(sft, tmp_path):
    """The shared trainer pieces reach DPO too: --push-to mirrors the saved checkpoint (with the tokenizer), and a
    non-finite loss stops the run before anything is saved from it."""
    remote = tmp_path / "remote"
    chat_dpo.main(tiny_args(sft, "--num-iterations", "2", "--push-to", f"file://{remote}"))
    pushed = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert "chatdpo_checkpoints/d2/meta_000002.json" in pushed and "chatdpo_checkpoints/d2/model_000002.pt" in pushed
    assert any(name.startswith("tokenizer/") for name in pushed)
    huge = ["--matrix-lr", "1e30", "--embedding-lr", "1e30", "--unembedding-lr", "1e30"]  # the first update blows up
    with pytest.raises(NonFiniteLossError, match="step 1"):
        chat_dpo.main(tiny_args(sft, "--num-iterations", "3", "--output-tag", "nan", *huge))
    nan_dir = os.path.join(sft, "chatdpo_checkpoints", "nan")
    assert not os.path.isdir(nan_dir) or not [f for f in os.listdir(nan_dir) if f.startswith(("model_", "meta_"))]
