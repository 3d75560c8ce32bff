"""SFT: loss normalization over the whole step (no NaN on fully masked micro-batches), packing, custom data
(exact row counts, repeat weights, bad rows), inheritance, the midtrain preset, and resume == uninterrupted."""
import argparse
import json
import math
import os
import shutil

import pytest
import torch

from nanochat.chat_dataloader import ConversationPacker
from nanochat.chat_format import load_conversations_jsonl
from nanochat.checkpoint_manager import find_last_step, load_model
from nanochat.cli import UserError
from nanochat.tokenizer import get_tokenizer
from nanochat.training import step_loss_scale
from nanochat.chat_format import model_think_default
from scripts import chat_sft
from scripts.chat_sft import parse_jsonl_spec, parse_args

T = 32  # SFT row length used throughout


@pytest.fixture(scope="module")
def tiny_base_template(tmp_path_factory, tiny_chat_tokenizer, build_tiny_checkpoint):
    """Tokenizer + a 2-layer GPT saved as base_checkpoints/d2 step 0, the way base_train saves one."""
    path = tmp_path_factory.mktemp("tiny_base")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        build_tiny_checkpoint(str(path), tiny_chat_tokenizer, 64, os.path.join("base_checkpoints", "d2"), 0, meta={
            "max_seq_len": 64, "device_batch_size": 4, "total_batch_size": 256,
            "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}})
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return path


@pytest.fixture
def base(tiny_base_template, _isolated_base_dir):
    """This test's NANOCHAT_BASE_DIR holding a copy of the tiny tokenizer + base checkpoint."""
    shutil.copytree(tiny_base_template, _isolated_base_dir, dirs_exist_ok=True)
    return _isolated_base_dir


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _qa_rows(n, prefix="q"):
    return [[{"role": "user", "content": f"{prefix} {i}: what is {i} + {i}?"},
             {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(n)]


def _tiny_args(*extra):
    return ["--device-type", "cpu", "--max-seq-len", str(T), "--device-batch-size", "2",
            "--total-batch-size", str(2 * T), "--eval-tokens", str(2 * T), "--chatcore-every", "-1", *extra]


def _load_tiny(base):
    return load_model("base", "cpu", "train")


# -----------------------------------------------------------------------------
# loss normalization

def test_fully_masked_microbatch_gives_zero_loss_and_grad(base):
    model, tok, _ = _load_tiny(base)
    x = torch.randint(0, tok.get_vocab_size(), (2, T))
    y = torch.full((2, T), -1)
    # the reference's mean over zero targets is NaN ...
    assert torch.isnan(model(x, y))
    # ... ours contributes exactly zero loss and zero gradient
    scale, n = step_loss_scale([(x, y)], world_size=1, ddp=False)
    assert n == 0 and scale == 1.0
    loss = model(x, y, loss_reduction="none").sum() * scale
    loss.backward()
    assert loss.item() == 0.0
    for p in model.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().max() == 0)


def test_step_loss_is_mean_over_all_trained_tokens_of_the_step(base):
    model, tok, _ = _load_tiny(base)
    V = tok.get_vocab_size()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)
    y1 = torch.full((2, T), -1)                       # nothing to train on
    y2 = torch.randint(0, V, (2, T), generator=g)
    y2[0, :20] = -1                                   # partially masked
    scale, n = step_loss_scale([(x1, y1), (x2, y2)], world_size=1, ddp=False)
    assert n == int((y2 >= 0).sum())
    for x, y in [(x1, y1), (x2, y2)]:
        (model(x, y, loss_reduction="none").sum() * scale).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # reference path: one plain mean over every trained token of the step
    model(torch.cat([x1, x2]), torch.cat([y1, y2])).backward()
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# packing

def _conversations(n, long_every=0):
    rows = []
    for i in range(n):
        user = f"question {i} " * (40 if long_every and i % long_every == 0 else 1 + i % 4)
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}]})
    return rows


def test_packer_uses_each_conversation_once_and_masks(base):
    tok = get_tokenizer()
    data = _conversations(23, long_every=5)
    packer = ConversationPacker(data, tok, batch_size=3, seq_len=T, device=torch.device("cpu"),
                                stop_at_epoch_end=True, buffer_size=4)
    bos = tok.get_bos_token_id()
    trained = 0
    batches = 0
    while not packer.exhausted:
        x, y = next(packer)
        batches += 1
        assert x.shape == y.shape == (3, T)
        assert (x[:, 0] == bos).all()  # every row starts at a conversation's <|bos|>
        trained += int((y >= 0).sum())
        assert batches < 100
    # every conversation exactly once, truncated to T+1 tokens: trained targets = sum of their masks
    expected = sum(sum(tok.render_conversation(c, max_tokens=T + 1)[1]) for c in data)
    assert packer.consumed == len(data)
    assert trained == expected
    x, y = next(packer)  # past the end: all padding, nothing to train
    assert (y == -1).all()


def test_packer_crop_and_loss_on_all(base):
    tok = get_tokenizer()
    data = _conversations(30)
    packer = ConversationPacker(data, tok, batch_size=2, seq_len=T, device=torch.device("cpu"),
                                packing="crop", loss_on="all", buffer_size=5)
    for _ in range(5):
        x, y = next(packer)
        assert (y >= 0).all()  # crop packing fills rows completely, and every token is a target
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_packer_resume_state_is_exact(base):
    tok = get_tokenizer()
    data = _conversations(40)
    kw = dict(tokenizer=tok, batch_size=2, seq_len=T, device=torch.device("cpu"), buffer_size=6)
    a = ConversationPacker(data, **kw)
    for _ in range(3):
        next(a)
    b = ConversationPacker(data, resume_state=json.loads(json.dumps(a.state_dict())), **kw)
    for _ in range(6):  # crosses into the second epoch
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# -----------------------------------------------------------------------------
# custom data

def test_jsonl_spec_parsing(tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", _qa_rows(1))
    assert parse_jsonl_spec(f) == (f, 1)
    assert parse_jsonl_spec(f + ":3") == (f, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="missing.jsonl does not exist"):
        parse_jsonl_spec(str(tmp_path / "missing.jsonl") + ":2")
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        parse_jsonl_spec(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="REPEAT must be a whole number >= 1, got -1"):
        parse_jsonl_spec(f + ":-1")


def test_extra_train_repeat_weighting(base, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _qa_rows(4, "a"))
    b = _write_jsonl(tmp_path / "b.jsonl", _qa_rows(3, "b"))
    args = parse_args(["--custom-only", "--extra-train-jsonl", f"{a}:3", "--extra-train-jsonl", b,
                       "--extra-val-jsonl", b])
    train, val, _, _ = chat_sft.build_mixtures(args)
    seen = {}
    for conv in train:
        key = conv["messages"][0]["content"]
        seen[key] = seen.get(key, 0) + 1
    assert len(train) == 4 * 3 + 3 and len(val) == 3
    assert all(seen[f"a {i}: what is {i} + {i}?"] == 3 for i in range(4))
    assert all(seen[f"b {i}: what is {i} + {i}?"] == 1 for i in range(3))


def test_offline_mixture_includes_extra_rows(base, tmp_path, monkeypatch):
    words = tmp_path / "words.txt"
    words.write_text("apple\nbanana\ncherry\nstrawberry\n")
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", str(words))
    a = _write_jsonl(tmp_path / "a.jsonl", _qa_rows(5, "a"))
    # no --offline: the hub is unreachable in tests, so it must fall back to the offline mixture by itself
    args = parse_args(["--extra-train-jsonl", f"{a}:2", "--offline-size", "10", "--identity-epochs", "1"])
    train, val, desc, offline = chat_sft.build_mixtures(args)
    assert offline and "offline" in desc
    identity = sum(1 for _ in open(chat_sft.default_identity_path()))
    assert len(train) == identity + 3 * 10 + 2 * 5
    assert len(val) == 3 * 200


def test_bad_rows_are_reported_with_file_and_line(base, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in _qa_rows(2)]
    rows.insert(1, json.dumps([{"role": "assistant", "content": "I speak first"}]))
    path.write_text("\n".join(rows) + "\n")
    args = parse_args(["--custom-only", "--extra-train-jsonl", str(path)])
    with pytest.raises(UserError) as e:
        chat_sft.build_mixtures(args)
    assert f"{path}:2" in str(e.value)


def test_identity_file_is_valid_and_on_persona():
    convs = load_conversations_jsonl(chat_sft.default_identity_path())
    assert len(convs) >= 200
    # every answer to a question about the model's name names it
    pairs = [(q["content"], a["content"]) for c in convs for q, a in zip(c["messages"], c["messages"][1:])
             if q["role"] == "user" and a["role"] == "assistant" and "your name" in q["content"].lower()]
    assert len(pairs) >= 30
    assert all("nanochat" in a for _, a in pairs)


# -----------------------------------------------------------------------------
# whole runs (in-process)

def test_custom_only_trains_on_exactly_the_given_rows(base, tmp_path, capsys):
    rows = _qa_rows(7)
    f = _write_jsonl(tmp_path / "mine.jsonl", rows)
    result = chat_sft.main(_tiny_args("--custom-only", "--extra-train-jsonl", f"{f}:2", "--eval-every", "-1",
                                      "--think-default", "on"))
    out = capsys.readouterr().out
    assert "Inherited embedding_lr=0.3" in out
    assert "NOTE: --max-seq-len=32 overrides the source checkpoint's value of 64" in out
    tok = get_tokenizer()
    assert result["consumed"] == 2 * len(rows)
    assert result["trained_tokens"] == 2 * sum(sum(tok.render_conversation(r, max_tokens=T + 1)[1]) for r in rows)
    assert math.isfinite(result["val_bpb"])
    meta = json.load(open(os.path.join(result["output_dir"], f"meta_{result['step']:06d}.json")))
    assert meta["max_seq_len"] == T and meta["user_config"]["embedding_lr"] == 0.3
    assert model_think_default(meta) == "on"  # what chat_cli/chat_eval/chat_probe prefill by default
    assert os.path.exists(os.path.join(base, "report", "chat-sft.md"))


def test_all_masked_microbatches_train_without_nan(base, tmp_path):
    # every other conversation is all question: truncated to T+1 tokens, none of its answer survives, so
    # with one row per micro-batch many micro-batches have no target at all (NaN in the reference)
    rows = []
    for i in range(6):
        q = "word " * (60 if i % 2 == 0 else 2)
        rows.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"ok {i}"}])
    f = _write_jsonl(tmp_path / "long.jsonl", rows)
    result = chat_sft.main(_tiny_args("--custom-only", "--extra-train-jsonl", f, "--device-batch-size", "1",
                                      "--total-batch-size", str(2 * T), "--eval-every", "-1"))
    model, _, _ = load_model("sft", "cpu", "eval")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result["consumed"] == len(rows)
    loss_points = [json.loads(line) for line in open(os.path.join(base, "report", "series.jsonl"))]
    assert loss_points and all(math.isfinite(p["value"]) for p in loss_points)


def test_resume_matches_uninterrupted_run(base, tmp_path):
    f = _write_jsonl(tmp_path / "mine.jsonl", _qa_rows(30))
    common = _tiny_args("--custom-only", "--extra-train-jsonl", f, "--num-iterations", "4", "--eval-every", "-1")
    chat_sft.main(common + ["--output-tag", "straight"])
    chat_sft.main(common + ["--output-tag", "split", "--save-every", "2"])
    os.remove(os.path.join(base, "chatsft_checkpoints", "split", "model_000004.pt"))
    chat_sft.main(common + ["--output-tag", "split", "--resume-from-step", "2"])
    a = torch.load(os.path.join(base, "chatsft_checkpoints", "straight", "model_000004.pt"))
    b = torch.load(os.path.join(base, "chatsft_checkpoints", "split", "model_000004.pt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_settings_inherit_from_the_source_and_leave_the_flags_alone(base, capsys):
    # the tiny base checkpoint: max_seq_len 64, device batch 4, total 256 tokens, LRs 0.3 / 0.004 / 0.02
    args = parse_args(["--device-batch-size", "2", "--embedding-lr", "0.5"])
    flags = dict(vars(args))
    s = chat_sft.resolve_settings(args, world_size=1)
    assert vars(args) == flags and args.max_seq_len is None
    assert (s.max_seq_len, s.device_batch_size, s.total_batch_size, s.grad_accum_steps) == (64, 2, 256, 2)
    assert (s.embedding_lr, s.unembedding_lr, s.matrix_lr) == (0.5, 0.004, 0.02)
    assert s.user_config["max_seq_len"] == 64 and s.user_config["embedding_lr"] == 0.5
    assert (s.start.source_tag, s.start.source_step, s.start.step_offset, s.start.resuming) == ("d2", 0, 0, False)
    assert s.start.output_dir.endswith(os.path.join("chatsft_checkpoints", "d2")) and s.report_section == "Chat SFT"
    out = capsys.readouterr().out
    assert "NOTE: --embedding-lr=0.5 overrides the source checkpoint's value of 0.3" in out
    assert "Inherited total_batch_size=256 from the source checkpoint" in out
    mid = chat_sft.resolve_settings(parse_args(["--preset", "midtrain"]), world_size=1)
    assert mid.start.output_dir.endswith(os.path.join("mid_checkpoints", "d2")) and mid.report_section == "Midtraining"
    assert mid.embedding_lr == 0.2  # the preset's LR, not the source's
    with pytest.raises(UserError, match="Set --total-batch-size to a multiple of 384"):
        chat_sft.resolve_settings(parse_args(["--device-batch-size", "3", "--total-batch-size", "1000"]), world_size=2)


def test_midtrain_preset_defaults_and_overrides():
    args = parse_args(["--preset", "midtrain"])
    assert (args.embedding_lr, args.unembedding_lr, args.matrix_lr) == (0.2, 0.004, 0.02)
    assert args.packing == "crop" and args.loss_on == "all" and args.init_lr_frac == 1.0
    assert args.warmdown_ratio == 0.2 and args.load_optimizer == 0
    args = parse_args(["--preset", "midtrain", "--matrix-lr", "0.01", "--packing", "pad"])
    assert args.matrix_lr == 0.01 and args.packing == "pad"
    assert parse_args([]).embedding_lr is None  # plain SFT inherits


def test_finetune_sft_checkpoint_in_place_continues_step_numbers(base, tmp_path):
    f = _write_jsonl(tmp_path / "mine.jsonl", _qa_rows(10))
    first = chat_sft.main(_tiny_args("--custom-only", "--extra-train-jsonl", f, "--num-iterations", "2",
                                     "--eval-every", "-1"))
    second = chat_sft.main(_tiny_args("--source", "sft", "--custom-only", "--extra-train-jsonl", f,
                                      "--num-iterations", "2", "--eval-every", "-1", "--preset", "midtrain"))
    # midtrain preset writes to mid_checkpoints; SFT-from-SFT into its own dir numbers steps after the source
    assert second["output_dir"].endswith(os.path.join("mid_checkpoints", "d2"))
    third = chat_sft.main(_tiny_args("--source", "sft", "--custom-only", "--extra-train-jsonl", f,
                                     "--num-iterations", "2", "--eval-every", "-1"))
    assert find_last_step(first["output_dir"]) == 4 and third["step"] == 2


DIST_DRIVER = """
import json, sys
from nanochat.chat_format import model_think_default
from scripts import chat_sft
result = chat_sft.main(json.loads(sys.argv[1]))
import os
with open(sys.argv[2] + f".rank{os.environ['RANK']}", "w") as f:
    json.dump({k: result[k] for k in ("step", "consumed", "trained_tokens", "val_bpb")}, f)
"""


def test_two_ranks_cover_the_epoch_once_and_stop_together(base, tmp_path, torchrun_two_ranks):
    # 11 conversations, rank-strided: rank 0 gets 6, rank 1 gets 5, and the long ones end up on rank 0, so
    # rank 1 runs out first and must keep stepping on all-padding batches (zero loss) until rank 0 is done
    rows = _qa_rows(11)
    for i in (0, 2, 4):
        rows[i][1]["content"] = "a long answer " * 12
    f = _write_jsonl(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "result"
    args = _tiny_args("--custom-only", "--extra-train-jsonl", f, "--device-batch-size", "1",
                      "--total-batch-size", str(2 * T), "--eval-every", "-1")
    torchrun_two_ranks(DIST_DRIVER, json.dumps(args), out)
    r0, r1 = (json.load(open(f"{out}.rank{r}")) for r in (0, 1))
    assert r0["consumed"] + r1["consumed"] == len(rows) and (r0["consumed"], r1["consumed"]) == (6, 5)
    assert r0["step"] == r1["step"] and r0["trained_tokens"] == r1["trained_tokens"]  # all-reduced count
    tok = get_tokenizer()
    assert r0["trained_tokens"] == sum(sum(tok.render_conversation(r, max_tokens=T + 1)[1]) for r in rows)
    assert math.isfinite(r0["val_bpb"]) and r0["val_bpb"] == r1["val_bpb"]
    ckpt = os.path.join(base, "chatsft_checkpoints", "d2")
    meta = json.load(open(os.path.join(ckpt, f"meta_{r0['step']:06d}.json")))
    assert [s["cursor"] for s in meta["dataloader_state_dicts"]] == [12, 11]  # each rank's own stream, saved
    assert os.path.exists(os.path.join(ckpt, f"optim_{r0['step']:06d}_rank1.pt"))
