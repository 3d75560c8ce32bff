"""Pretraining: the depth dial vs the reference's numbers, schedules, bits per byte vs a hand computation,
resume == uninterrupted, 2 gloo ranks == 1 rank with grad accumulation, continued pretraining / context
extension, and base_eval's outputs. Models are tiny (d2, 64 wide, 32-token context)."""
import dataclasses
import json
import math
import os

import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import set_schedule
from nanochat.samples import SAMPLE_PROMPTS
from nanochat.scaling import B_REF, build_meta_model, model_config_for_depth, ntk_rope_base, plan_training
from nanochat.training import lr_multiplier, muon_momentum
from nanochat.tokenizer import get_token_bytes
from scripts import base_eval
from scripts import base_train as bt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--window-pattern", "L",
        "--device-batch-size", "2", "--total-batch-size", "128", "--core-metric-every", "-1", "--sample-every", "-1",
        "--eval-every", "-1", "--warmup-steps", "2", "--compile", "0"]


@pytest.fixture
def text_dir(tmp_path, write_tiny_corpus):
    return write_tiny_corpus(tmp_path / "corpus")


def load_weights(ckpt_dir, step):
    return torch.load(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), map_location="cpu")


def assert_weights_close(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# -----------------------------------------------------------------------------
# the depth dial vs the reference table (reference/nanochat.md §2.5), on meta-device models

REFERENCE_TABLE = [  # depth, scaling params (M), FLOPs/token, auto batch, steps @10.5, LR scale, Muon WD
    (12, 110.1, 7.6e8, 524_288, 2205, 1.0, 0.28),
    (20, 435.2, 2.89e9, 1_048_576, 4357, 1.414, 0.100),
    (24, 729.8, 4.78e9, 1_048_576, 7308, 1.414, 0.060),
    (26, 918.4, 5.99e9, 1_048_576, 9196, 1.414, 0.048),
    (32, 1678.0, 1.08e10, 2_097_152, 8400, 2.0, 0.037),
]


def default_plan(depth, ratio, **overrides):
    cfg = lambda d: model_config_for_depth(d, 64, 128, 2048, 32768, "SSSL")
    model, d12 = build_meta_model(cfg(depth)), build_meta_model(cfg(12))
    kwargs = dict(num_iterations=-1, target_flops=-1.0, target_param_data_ratio=ratio, total_batch_size=-1,
                  weight_decay=0.28, scaling_params=model.num_scaling_params(),
                  d12_scaling_params=d12.num_scaling_params(), flops_per_token=model.estimate_flops())
    kwargs.update(overrides)
    return model, plan_training(**kwargs)


@pytest.mark.parametrize("depth,scaling_m,flops,batch,steps,lr_scale,wd", REFERENCE_TABLE)
def test_depth_dial_matches_reference_table(depth, scaling_m, flops, batch, steps, lr_scale, wd):
    model, plan = default_plan(depth, 10.5)
    assert model.config.n_embd == depth * 64 and model.config.n_head == depth // 2
    assert model.num_scaling_params() / 1e6 == pytest.approx(scaling_m, abs=0.05 if depth < 32 else 0.5)
    assert model.estimate_flops() == pytest.approx(flops, rel=0.01)
    assert plan["total_batch_size"] == batch and plan["batch_auto"]
    assert plan["num_iterations"] == steps
    assert plan["batch_lr_scale"] == pytest.approx(lr_scale, abs=1e-3)
    assert plan["weight_decay_scaled"] == pytest.approx(wd, abs=1e-3)


def test_speedrun_horizon_and_ratio_independence():
    assert default_plan(24, 8)[1]["num_iterations"] == 5568  # d24 @ ratio 8 (speedrun)
    # the ratio cancels in the batch-size and weight-decay rules
    _, p12 = default_plan(20, 12)
    _, p105 = default_plan(20, 10.5)
    assert p12["total_batch_size"] == p105["total_batch_size"]
    assert p12["weight_decay_scaled"] == pytest.approx(p105["weight_decay_scaled"])


def test_horizon_precedence():
    model, p = default_plan(12, 12, num_iterations=7, target_flops=1e18)
    assert p["num_iterations"] == 7 and p["horizon_source"] == "--num-iterations"
    model, p = default_plan(12, 12, target_flops=1e18)
    assert p["num_iterations"] == round(1e18 / (model.estimate_flops() * 524_288))
    model, p = default_plan(12, 12, total_batch_size=65536)
    assert p["num_iterations"] == int(12 * model.num_scaling_params()) // 65536 and not p["batch_auto"]
    assert p["batch_lr_scale"] == pytest.approx(math.sqrt(65536 / 2 ** 19))
    with pytest.raises(ValueError, match="No training horizon"):
        default_plan(12, -1)


def test_ntk_rope_base():
    assert ntk_rope_base(100000, 2048, 8192, 128) == pytest.approx(100000 * 4 ** (128 / 126))


# -----------------------------------------------------------------------------
# LR scaling with the total batch size: every optimizer group follows sqrt(B / B_REF)

@pytest.mark.parametrize("total_batch_size", [B_REF, 2048])
def test_every_group_lr_follows_the_batch_scaling(base, total_batch_size):
    out = bt.main(TINY + ["--synthetic-data", "--num-iterations", "0", "--total-batch-size", str(total_batch_size)])
    groups = torch.load(os.path.join(out["checkpoint_dir"], "optim_000000_rank0.pt"))["param_groups"]
    dmodel_scale = (64 / 768) ** -0.5
    # the LRs before the fix, default flags: lm_head, wte, value embeds, resid lambdas, x0 lambdas, smear/backout
    reference_adamw = [0.008 * dmodel_scale, 0.3 * dmodel_scale, 0.5 * 0.3 * dmodel_scale, 0.01 * 0.5, 0.5, 0.2]
    adamw = [g["lr"] for g in groups if g["kind"] == "adamw"]
    muon = [g["lr"] for g in groups if g["kind"] == "muon"]
    assert len(muon) == 4 and all(g["lr"] == g["initial_lr"] for g in groups)
    if total_batch_size == B_REF:  # the speedrun's LRs, to the bit
        assert adamw == reference_adamw and muon == [0.02] * 4
    else:
        scale = (total_batch_size / B_REF) ** 0.5
        assert adamw == pytest.approx([lr * scale for lr in reference_adamw], rel=1e-12)
        assert muon == pytest.approx([0.02 * scale] * 4, rel=1e-12)


def zipf_bigram_batches(vocab_size, B, T, seed):
    """Text-like tokens: Zipf-distributed, and half of them the fixed successor of the previous token."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab_size + 1)
    successor = torch.randint(0, vocab_size, (vocab_size,), generator=g)
    while True:
        x = torch.multinomial(zipf, B * (T + 1), replacement=True, generator=g).view(B, T + 1)
        follow = torch.rand(B, T + 1, generator=g) < 0.5
        for t in range(T):
            x[:, t + 1] = torch.where(follow[:, t + 1], successor[x[:, t]], x[:, t + 1])
        yield x[:, :-1], x[:, 1:]


def train_small_batch_d4(fixed_smear_lr, seed, steps=30, warmup_steps=20, B=4, T=32):
    """A d4 (backout after block 2, so x_final = (resid_lambdas[3] - backout_lambda) * x_mid + ...) trained at a
    total batch of B*T = 128 tokens with base_train's LRs, scaling and schedules. fixed_smear_lr: the smear/backout
    group keeps nanochat's fixed 0.2 while every other group is scaled (by 1/64 here).
    Returns per step (loss, backout_lambda, resid_lambdas[-1])."""
    args = bt.build_parser().parse_args([])
    scale = (B * T / B_REF) ** 0.5
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(model_config_for_depth(4, 16, 32, T, 1024, "L"))
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      scalar_lr=args.scalar_lr * scale, matrix_lr=args.matrix_lr * scale,
                                      weight_decay=args.weight_decay)
    if fixed_smear_lr:
        group = next(g for g in optimizer.param_groups if any(p is model.backout_lambda for p in g["params"]))
        group["lr"] = group["initial_lr"] = 0.2
    batches = zipf_bigram_batches(1024, B, T, seed)
    trace = []
    for step in range(steps):
        x, y = next(batches)
        loss = model(x, y)
        loss.backward()
        set_schedule(optimizer, lr_multiplier(step, steps, warmup_steps, 0.0, 0.0), muon_momentum(step, steps, 0.0))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        trace.append((loss.item(), model.backout_lambda.item(), model.resid_lambdas[-1].item()))
    return trace


def test_small_batch_backout_flip_needs_the_fixed_smear_lr():
    """nanochat's fixed smear/backout LR at a small batch: backout_lambda overtakes the last resid_lambda during the
    warmup, the mid residual reaches lm_head with its sign flipped and the loss jumps above the step-0 loss.
    With the group scaled like the others it stays far below."""
    fixed = train_small_batch_d4(fixed_smear_lr=True, seed=0)
    assert any(backout > resid for _, backout, resid in fixed)
    assert max(loss for loss, _, _ in fixed[5:]) > fixed[0][0] + 0.03
    scaled = train_small_batch_d4(fixed_smear_lr=False, seed=0)
    assert all(backout < resid - 0.5 for _, backout, resid in scaled)
    assert max(loss for loss, _, _ in scaled[5:]) < scaled[0][0] + 0.01


def test_seed_sets_the_init(base):
    def init(seed, tag):
        out = bt.main(TINY + ["--synthetic-data", "--num-iterations", "0", "--seed", seed, "--model-tag", tag])
        return load_weights(out["checkpoint_dir"], 0)
    default, again, other = init("42", "a"), init("42", "b"), init("7", "c")
    assert_weights_close(default, again)
    assert not torch.equal(default["transformer.wte.weight"], other["transformer.wte.weight"])


# -----------------------------------------------------------------------------
# bits per byte

class FixedLossModel(torch.nn.Module):
    """forward(x, y, loss_reduction='none') returns the loss table entry for each position (x holds row ids)."""
    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.table[x[:, 0]]


def test_bpb_matches_hand_computation():
    token_bytes = torch.tensor([1, 2, 3, 0, 4], dtype=torch.int32)  # id 3 is a special token
    g = torch.Generator().manual_seed(0)
    batches, table = [], torch.rand(6, 5, generator=g) * 5
    table[0, 2] = float("inf")  # batch 0, row 0, position 2 is an ignored target: its loss must not count
    for b in range(3):
        y = torch.randint(0, 5, (2, 5), generator=g)
        y[0, 2] = -1
        x = torch.tensor([[2 * b], [2 * b + 1]]).expand(2, 5)
        batches.append((x, y))
    nats = nbytes = 0.0
    for x, y in batches:
        for i in range(2):
            for j in range(5):
                t = int(y[i, j])
                if t >= 0 and token_bytes[t] > 0:
                    nats += float(table[int(x[i, 0]), j])
                    nbytes += int(token_bytes[t])
    got = evaluate_bpb(FixedLossModel(table), batches, 3, token_bytes)
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-12)
    # only the first `steps` batches count
    first = evaluate_bpb(FixedLossModel(table), batches, 1, token_bytes)
    assert first != pytest.approx(got)


# -----------------------------------------------------------------------------
# end to end: resume, distributed, continued pretraining

def test_resume_equals_uninterrupted(base, text_dir):
    """Real text through the real loader (buffered best-fit packing): the resumed run must see exactly the
    batches, optimizer state, schedules and loss EMA of the uninterrupted one."""
    argv = TINY + ["--data-dir", text_dir, "--num-iterations", "5", "--save-every", "3"]
    full = bt.main(argv)
    ckpt_dir = full["checkpoint_dir"]
    full_weights = load_weights(ckpt_dir, 5)
    with open(os.path.join(ckpt_dir, "meta_000005.json")) as f:
        full_meta = json.load(f)
    assert sorted(full["losses"]) == list(range(5)) and full["grad_accum_steps"] == 2
    assert {"model_config", "user_config", "dataloader_state_dict", "loop_state", "device_batch_size",
            "max_seq_len", "total_batch_size", "step", "val_bpb"} <= set(full_meta)

    resumed = bt.main(argv + ["--resume-from-step", "3"])
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == full["losses"][step], step
    assert_weights_close(load_weights(ckpt_dir, 5), full_weights)
    with open(os.path.join(ckpt_dir, "meta_000005.json")) as f:
        meta = json.load(f)
    assert meta["loop_state"]["smooth_train_loss"] == full_meta["loop_state"]["smooth_train_loss"]
    assert meta["dataloader_state_dict"] == full_meta["dataloader_state_dict"]
    assert meta["user_config"]["resume_from_step"] == 3

    # 'last' picks step 5, which is already the end: nothing to train, the checkpoint is re-saved unchanged
    again = bt.main(argv + ["--resume-from-step", "last"])
    assert again["losses"] == {}
    assert_weights_close(load_weights(ckpt_dir, 5), full_weights)
    with open(os.path.join(ckpt_dir, "meta_000005.json")) as f:
        assert json.load(f)["dataloader_state_dict"] == full_meta["dataloader_state_dict"]


DIST_DRIVER = """
import json, os, sys
import torch.distributed as dist
from scripts import base_train as bt
bt.compute_cleanup = lambda: None  # keep one process group for the three runs (re-initializing can hang)
common, text_dir, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {"synthetic": bt.main(common + ["--synthetic-data", "--eval-every", "4", "--eval-tokens", "256", "--model-tag", "two"])["losses"]}
text = common + ["--data-dir", text_dir, "--save-every", "2", "--model-tag", "txt"]
out["text_full"] = bt.main(text)["losses"]
out["text_resumed"] = bt.main(text + ["--resume-from-step", "2"])["losses"]
if os.environ["RANK"] == "0":
    with open(out_path, "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_with_grad_accum(base, text_dir, tmp_path, capsys, torchrun_two_ranks):
    """Same total batch: 1 rank x 2 micro-steps vs 2 ranks x 1 micro-step (gradients averaged inside the
    optimizer). Synthetic data hands global micro-batch g to rank g % world, so both see identical batches.
    The same torchrun job also checks that a 2-rank run on text (each rank its own stripe) resumes exactly."""
    common = TINY + ["--num-iterations", "4"]
    single = bt.main(common + ["--synthetic-data", "--eval-every", "4", "--eval-tokens", "256", "--model-tag", "one"])
    single_log = capsys.readouterr().out
    out_path = tmp_path / "dist_losses.json"
    stdout, _ = torchrun_two_ranks(DIST_DRIVER, json.dumps(common), text_dir, out_path)
    assert "gradient accumulation steps: 1" in stdout and "gradient accumulation steps: 2" in single_log
    with open(out_path) as f:
        dist_out = {k: {int(s): v for s, v in d.items()} for k, d in json.load(f).items()}
    assert sorted(dist_out["synthetic"]) == [0, 1, 2, 3]
    for step, loss in single["losses"].items():
        assert dist_out["synthetic"][step] == pytest.approx(loss, abs=1e-5), step
    root = os.path.join(base, "base_checkpoints")
    assert_weights_close(load_weights(os.path.join(root, "two"), 4), load_weights(os.path.join(root, "one"), 4), atol=1e-5)
    with open(os.path.join(root, "two", "meta_000004.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 2 and meta["val_bpb"] == pytest.approx(single["val_bpb"], rel=1e-4)
    assert os.path.exists(os.path.join(root, "two", "optim_000004_rank1.pt"))
    # 2-rank resume on text: every rank's loader state is saved, so steps 2-3 repeat exactly
    assert sorted(dist_out["text_resumed"]) == [2, 3]
    for step in (2, 3):
        assert dist_out["text_resumed"][step] == dist_out["text_full"][step], step
    with open(os.path.join(root, "txt", "meta_000002.json")) as f:
        states = json.load(f)["dataloader_state_dicts"]
    assert [s["rank"] for s in states] == [0, 1]


def test_val_bpb_during_training_matches_reloaded_checkpoint(base, text_dir):
    """The val bpb logged during training must be the bpb of the weights being trained (no stale inference
    caches): it equals evaluate_bpb on the saved checkpoint, and it moves away from the initial value."""
    out = bt.main(TINY + ["--data-dir", text_dir, "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "256",
                          "--warmup-steps", "1"])
    model, tokenizer, _ = load_model("base", "cpu", "eval")
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 2, 32, "val", device="cpu", data_dir=text_dir)
    fresh = evaluate_bpb(model, loader, 4, get_token_bytes())
    assert out["val_bpb"] == pytest.approx(fresh, rel=1e-5)
    with open(os.path.join(out["checkpoint_dir"], "meta_000006.json")) as f:
        assert json.load(f)["val_bpb"] == out["val_bpb"]
    assert out["val_bpb_curve"][-1][1] < out["val_bpb_curve"][0][1] - 0.01  # and it did learn


def test_init_from_context_extension(base, capsys):
    src = bt.main(TINY + ["--synthetic-data", "--num-iterations", "2", "--model-tag", "d2"])
    capsys.readouterr()
    # continued pretraining with a 2x longer context, 0 steps: the saved model must be the source's weights
    out = bt.main(["--init-from", "d2", "--max-seq-len", "64", "--synthetic-data", "--num-iterations", "0", "--compile", "0",
                   "--device-batch-size", "2", "--total-batch-size", "128", "--eval-every", "-1",
                   "--core-metric-every", "-1", "--sample-every", "-1"])
    log = capsys.readouterr().out
    assert out["checkpoint_dir"].endswith(os.path.join("base_checkpoints", "d2_cpt"))
    expected_base = 100000 * 2 ** (32 / 30)  # head_dim 32: NTK-aware exponent d/(d-2)
    assert out["model_config"]["rope_base"] == pytest.approx(expected_base)
    assert out["model_config"]["sequence_len"] == 64 and out["model_config"]["window_pattern"] == "L"
    assert "RoPE base 100000 -> " in log
    assert_weights_close(load_weights(out["checkpoint_dir"], 0), load_weights(src["checkpoint_dir"], 2))
    with open(os.path.join(out["checkpoint_dir"], "meta_000000.json")) as f:
        assert json.load(f)["init_from"] == "d2:2"
    with pytest.raises(ValueError, match="Drop those flags"):
        bt.main(["--init-from", "d2", "--depth", "4", "--synthetic-data", "--num-iterations", "0"])


def test_settings_are_resolved_once_and_leave_the_flags_alone(base, tiny_tokenizer):
    """resolve_settings gives the scaling laws' numbers for the model it configures (recomputed here from meta
    models), resolves 'last' and --init-from, and never writes to args."""
    parser, vocab_size = bt.build_parser(), tiny_tokenizer.get_vocab_size()
    argv = TINY + ["--synthetic-data", "--num-iterations", "2", "--model-tag", "d2"]
    bt.main(argv)  # a checkpoint to resume and to continue from
    args = parser.parse_args(argv + ["--resume-from-step", "last"])
    flags = dict(vars(args))
    s = bt.resolve_settings(args, bt.explicit_flags(parser, argv), vocab_size, world_size=1)
    assert vars(args) == flags
    assert s.resuming and s.resume_step == 2 and s.checkpoint_dir.endswith(os.path.join("base_checkpoints", "d2"))
    assert (s.num_iterations, s.total_batch_size, s.grad_accum_steps) == (2, 128, 2)
    config = model_config_for_depth(2, 32, 32, 32, vocab_size, "L")
    model = build_meta_model(config)
    d12 = build_meta_model(model_config_for_depth(12, 32, 32, 32, vocab_size, "L"))
    plan = plan_training(2, -1.0, 12, 128, 0.28, model.num_scaling_params(), d12.num_scaling_params(),
                         model.estimate_flops())
    assert s.model_config == config and s.flops_per_token == model.estimate_flops()
    assert (s.batch_lr_scale, s.weight_decay_scaled, s.horizon_source) == (
        plan["batch_lr_scale"], plan["weight_decay_scaled"], "--num-iterations")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_iterations = 3
    # --init-from: the shape is the source's (user_config records its depth), the flags stay as typed
    argv = ["--init-from", "d2", "--synthetic-data", "--num-iterations", "0", "--device-batch-size", "2",
            "--total-batch-size", "128"]
    args = parser.parse_args(argv)
    s = bt.resolve_settings(args, bt.explicit_flags(parser, argv), vocab_size, world_size=1)
    assert args.depth == 20 and s.user_config["depth"] == 2 and s.model_tag == "d2_cpt" and not s.resuming
    assert s.init_from["step"] == 2 and (s.model_config.n_layer, s.model_config.n_embd) == (2, 64)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--resume-from-step", "latest"])
    assert e.value.code == 2


def test_bad_batch_sizes_fail_before_training(base):
    with pytest.raises(ValueError, match="--total-batch-size to a multiple of 96"):
        bt.main(TINY + ["--synthetic-data", "--num-iterations", "1", "--device-batch-size", "3",
                        "--total-batch-size", "1000"])


# -----------------------------------------------------------------------------
# base_eval

def test_base_eval_core_csv_and_samples(base, monkeypatch):
    bt.main(TINY + ["--synthetic-data", "--num-iterations", "1", "--model-tag", "d2", "--max-seq-len", "64"])
    fake = {"results": {"hellaswag": 0.3, "arc_easy": 0.5},
            "centered_results": {"hellaswag": 0.0667, "arc_easy": 0.3333}, "core_metric": 0.2}
    monkeypatch.setattr(base_eval, "evaluate_core", lambda *a, **k: fake)
    out = base_eval.main(["--eval", "core,sample", "--device-type", "cpu"])
    with open(out["csv_path"]) as f:
        rows = [[c.strip() for c in line.split(",")] for line in f.read().splitlines()]
    assert out["csv_path"].endswith(os.path.join("base_eval", "base_model_000001.csv"))
    assert rows == [["Task", "Accuracy", "Centered"], ["hellaswag", "0.300000", "0.066700"],
                    ["arc_easy", "0.500000", "0.333300"], ["CORE", "", "0.200000"]]
    assert len(out["samples"]) == len(SAMPLE_PROMPTS) and len(out["unconditional"]) == 8
    assert out["samples"][0].startswith("<|bos|>The capital of France is")


def test_base_eval_bpb(base, text_dir):
    bt.main(TINY + ["--data-dir", text_dir, "--num-iterations", "1", "--model-tag", "d2"])
    out = base_eval.main(["--eval", "bpb", "--device-batch-size", "2", "--split-tokens", "200",
                          "--data-dir", text_dir, "--device-type", "cpu"])
    assert 0 < out["train_bpb"] < 20 and 0 < out["val_bpb"] < 20
