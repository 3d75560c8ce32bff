"""nanochat.training, the pieces every trainer shares: batch arithmetic and its error, schedules, the step line
(EMA, tok/s, MFU, training time, ETA) against hand computations, the GC policy, settings inheritance, the
optimizer warm start against the saved state, and the compile fallback."""
import gc
import os
import sys

import pytest
import torch

from nanochat import chunked_loss, training
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import DummyWandb


def cpu_runtime(peak_flops=0.0, world_size=1):
    return training.Runtime("cpu", torch.device("cpu"), world_size > 1, 0, world_size, peak_flops)


# -----------------------------------------------------------------------------
# the batch

def test_grad_accum_steps_and_divisibility_error():
    assert training.compute_grad_accum_steps(524288, 32, 2048, 8) == 1
    assert training.compute_grad_accum_steps(524288, 16, 2048, 1) == 16
    with pytest.raises(ValueError) as e:
        training.compute_grad_accum_steps(100_000, 32, 2048, 8)
    msg = str(e.value)
    assert "--device-batch-size 32 x --max-seq-len 2048 x 8 rank(s) = 524,288" in msg
    assert "--total-batch-size to a multiple of 524,288" in msg
    with pytest.raises(ValueError, match=r"e\.g\. 1,536 or 2,048"):
        training.compute_grad_accum_steps(1800, 2, 256, 1)
    # a total below one micro-step names the smallest total that works and the device batch sizes that divide it
    with pytest.raises(ValueError) as e:
        training.compute_grad_accum_steps(256, 4, 128, 1)
    assert "e.g. 512 or 512" in str(e.value) and "[1, 2]" in str(e.value)
    with pytest.raises(ValueError, match="no --device-batch-size works with --max-seq-len 100"):
        training.compute_grad_accum_steps(128, 2, 100, 1)


def test_batch_arithmetic_lines(capsys):
    training.print_batch_arithmetic(16, 512, 16384, 2)
    assert capsys.readouterr().out.splitlines() == ["Tokens / micro-batch / rank: 16 x 512 = 8,192",
                                                    "Total batch size 16,384 => gradient accumulation steps: 2"]


# -----------------------------------------------------------------------------
# schedules

def test_schedules():
    N = 1000
    lr = lambda it: training.lr_multiplier(it, N, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
    assert lr(0) == pytest.approx(1 / 40) and lr(39) == 1.0 and lr(350) == 1.0
    assert lr(N - 1) == pytest.approx(0.05 + 0.95 / 650) and lr(N) == pytest.approx(0.05)
    assert lr(N - 325) == pytest.approx(0.525)
    mom = lambda it: training.muon_momentum(it, N, 0.65)
    assert mom(0) == 0.85 and mom(200) == pytest.approx(0.91) and mom(349) == pytest.approx(0.85 + 0.12 * 349 / 400)
    assert mom(400) == pytest.approx(0.97 - 0.07 * 50 / 650)  # warmdown started at step 350
    assert training.muon_momentum(500, 2000, 0.65) == 0.97
    assert training.muon_weight_decay(0, N, 0.2) == 0.2 and training.muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)


def test_progress_schedules():
    # SFT's defaults: flat, then a linear warmdown over the last half to 0
    sft = lambda p: training.progress_lr_multiplier(p, 0.0, 0.5, 0.0)
    assert sft(0.0) == 1.0 and sft(0.5) == 1.0 and sft(0.75) == pytest.approx(0.5) and sft(1.0) == 0.0
    # warmup over the first 10%, and a floor at final_lr_frac
    assert training.progress_lr_multiplier(0.05, 0.1, 0.2, 0.1) == pytest.approx(0.5)
    assert training.progress_lr_multiplier(0.9, 0.1, 0.2, 0.1) == pytest.approx(0.55)
    # (0, 1, 0) is RL's 1 - step / num_steps
    for step in range(0, 11):
        assert training.progress_lr_multiplier(step / 10, 0.0, 1.0, 0.0) == pytest.approx(1 - step / 10)
    # SFT's Muon momentum: 0.85 -> 0.95 over 300 steps, then flat
    assert training.linear_ramp(0, 0.85, 0.95, 300) == 0.85
    assert training.linear_ramp(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert training.linear_ramp(300, 0.85, 0.95, 300) == 0.95 == training.linear_ramp(5000, 0.85, 0.95, 300)


# -----------------------------------------------------------------------------
# the step line

def test_step_meter_matches_hand_computation():
    rt = cpu_runtime(peak_flops=1e9, world_size=2)
    meter = training.StepMeter(flops_per_token=1000, runtime=rt, untimed_steps=2)
    losses, dts = [4.0, 3.0, 2.0, 1.5, 1.0], [1.0, 0.5, 0.25, 0.5, 0.25]
    ema = 0.0
    for i, (loss, dt) in enumerate(zip(losses, dts)):
        meter.update(loss, dt, tokens=512, steps_done=i + 1)
        ema = 0.9 * ema + 0.1 * loss
        assert meter.loss == pytest.approx(ema / (1 - 0.9 ** (i + 1)))
        assert meter.tok_per_sec == int(512 / dt)
        assert meter.mfu == pytest.approx(100 * 1000 * 512 / dt / (1e9 * 2))
        if i < 2:
            assert meter.eta(10) is None  # nothing timed yet: no ETA
    assert meter.total_time == pytest.approx(0.25 + 0.5 + 0.25)  # the first two (untimed) steps are not counted
    assert meter.eta(6) == pytest.approx(6 * 1.0 / 3)
    assert training.mfu_percent(1000, 512, 0.5, 0.0, 1) == 0.0  # unknown peak (CPU): 0


def test_step_meter_resumes_its_ema_and_time():
    full = training.StepMeter(100, cpu_runtime(), untimed_steps=0)
    for step, loss in enumerate([5.0, 4.0, 3.0, 2.5]):
        full.update(loss, 0.1, 100, step + 1)
    part = training.StepMeter(100, cpu_runtime(), untimed_steps=0)
    for step, loss in enumerate([5.0, 4.0]):
        part.update(loss, 0.1, 100, step + 1)
    resumed = training.StepMeter(100, cpu_runtime(), smooth_loss=part.smooth_loss, total_time=part.total_time,
                                 untimed_steps=0)
    for step, loss in [(2, 3.0), (3, 2.5)]:
        resumed.update(loss, 0.1, 100, step + 1)
    assert resumed.loss == full.loss and resumed.total_time == pytest.approx(full.total_time)


def test_step_lines_keep_the_trainers_formats():
    meter = training.StepMeter(1000, cpu_runtime(peak_flops=2e6), untimed_steps=0)
    meter.update(2.0, 0.5, tokens=1000, steps_done=1)
    base = meter.line("00007/00020", 35.0, 0.25, "1 pq: 0 rg: 1", meter.eta(12), mfu_label="bf16_mfu")
    assert base == ("step 00007/00020 (35.00%) | loss: 2.000000 | lrm: 0.25 | dt: 500.00ms | tok/sec: 2,000 | "
                    "bf16_mfu: 100.00 | epoch: 1 pq: 0 rg: 1 | total time: 0.01m | eta: 0.1m")
    sft = meter.line("00003", 12.5, 1.0, 2, None, extra={"trained tok": "847"})
    assert sft == ("step 00003 (12.50%) | loss: 2.000000 | lrm: 1.00 | dt: 500.00ms | tok/sec: 2,000 | "
                   "trained tok: 847 | mfu: 100.00 | epoch: 2 | total time: 0.01m")
    assert meter.wandb_metrics() == {"train/loss": 2.0, "train/dt": 0.5, "train/tok_per_sec": 2000, "train/mfu": 100.0}


def test_manual_gc_freezes_after_the_first_step_and_restores(monkeypatch):
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or real_collect(*args))
    assert gc.isenabled()
    with training.ManualGC(collect_every=3) as manual_gc:
        assert gc.isenabled()  # the setup still runs with the normal collector
        manual_gc.after_step(1)  # after the first step: collect, freeze the survivors, collector off
        assert not gc.isenabled() and gc.get_freeze_count() > 0 and len(collections) == 1
        manual_gc.after_step(2)
        assert len(collections) == 1
        manual_gc.after_step(3)  # every collect_every steps: by hand
        assert len(collections) == 2 and not gc.isenabled()
        manual_gc.after_step(4)
        assert len(collections) == 2
    assert gc.isenabled() and gc.get_freeze_count() == 0


# -----------------------------------------------------------------------------
# fine-tuning from a checkpoint

def test_inherit_settings(capsys):
    got = training.inherit_settings([("max_seq_len", None, 256, 2048), ("device_batch_size", None, None, 32),
                                     ("embedding_lr", 0.5, 0.3, 0.2), ("matrix_lr", 0.02, 0.02, 0.02)])
    assert got == {"max_seq_len": 256, "device_batch_size": 32, "embedding_lr": 0.5, "matrix_lr": 0.02}
    assert capsys.readouterr().out.splitlines() == [
        "Inherited max_seq_len=256 from the source checkpoint",
        "Inherited device_batch_size=32 from the default (not in the checkpoint)",
        "NOTE: --embedding-lr=0.5 overrides the source checkpoint's value of 0.3",
        "Using matrix_lr=0.02"]


def test_warm_start_keeps_this_runs_lrs_and_loads_the_state(tmp_path, capsys, build_tiny_gpt):
    model = build_tiny_gpt(16, 64)
    source = model.setup_optimizer(embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2)
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    source.step()
    save_checkpoint(str(tmp_path), 5, model.state_dict(), source.state_dict(), {"step": 5})
    fresh = model.setup_optimizer(embedding_lr=0.1, matrix_lr=0.01, weight_decay=0.0)
    want_lrs = [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in fresh.param_groups]
    training.warm_start_optimizer(fresh, str(tmp_path), 5, cpu_runtime(), required=False)
    assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in fresh.param_groups] == want_lrs
    saved, loaded = source.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for index in saved:
        for name, value in saved[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded[index][name])), (index, name)
    training.scale_learning_rates(fresh, 0.5)
    assert [(g["lr"], g["initial_lr"]) for g in fresh.param_groups] == [(lr * 0.5, lr * 0.5) for lr, _, _ in want_lrs]
    # no shard: a warning when warm-starting, an error when resuming
    capsys.readouterr()
    training.warm_start_optimizer(fresh, str(tmp_path / "missing"), 5, cpu_runtime(), required=False)
    assert "WARNING: no optimizer state to warm-start from" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        training.warm_start_optimizer(fresh, str(tmp_path / "missing"), 5, cpu_runtime(), required=True)


def test_find_checkpoint_and_read_meta(_isolated_base_dir, build_tiny_gpt):
    model = build_tiny_gpt(16, 64)
    for tag, step in [("d2", 3), ("d2", 7), ("d10", 1)]:
        save_checkpoint(str(_isolated_base_dir / "chatsft_checkpoints" / tag), step, model.state_dict(), None,
                        {"step": step, "model_config": {"n_layer": 2}})
    assert training.find_checkpoint("sft") == (str(_isolated_base_dir / "chatsft_checkpoints" / "d10"), "d10", 1)
    directory, tag, step = training.find_checkpoint("sft", "d2")
    assert (tag, step) == ("d2", 7) and training.read_checkpoint_meta(directory, step)["step"] == 7
    assert training.find_checkpoint("sft", "d2", 3)[2] == 3
    with pytest.raises(FileNotFoundError, match=r"complete steps there: \[3, 7\]"):
        training.read_checkpoint_meta(directory, 5)


# -----------------------------------------------------------------------------
# compile fallback, saving

def test_compile_failure_falls_back_to_eager(monkeypatch, capsys, build_tiny_gpt):
    model = build_tiny_gpt(16, 64)

    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler\nlong traceback")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(chunked_loss, "COMPILE_ELEMENTWISE", False)
    x = torch.randint(0, 64, (2, 16))
    train_model = training.compile_with_fallback(model, x, x)
    assert train_model is model and chunked_loss.COMPILE_ELEMENTWISE is False
    assert all(p.grad is None for p in model.parameters())
    out = capsys.readouterr().out
    assert "WARNING: torch.compile failed (RuntimeError: inductor: no working C++ compiler); training uncompiled" in out


def test_compile_warm_up_discards_its_gradients(monkeypatch, build_tiny_gpt):
    model = build_tiny_gpt(16, 64)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the warm-up logic, not inductor
    monkeypatch.setattr(chunked_loss, "COMPILE_ELEMENTWISE", False)
    x = torch.randint(0, 64, (2, 16))
    assert training.compile_with_fallback(model, x, x, loss_reduction="sum") is model
    assert chunked_loss.COMPILE_ELEMENTWISE is True
    assert all(p.grad is None for p in model.parameters())


def test_should_compile_flag(monkeypatch):
    assert training.should_compile(1, "cpu") and not training.should_compile(0, "cuda")
    assert training.should_compile(-1, "cuda") and not training.should_compile(-1, "mps")
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    assert not training.should_compile(-1, "cpu")


def test_checkpoint_meta_and_single_rank_helpers(base, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    meta = training.checkpoint_meta(12, 0.9, {"n_layer": 2}, {"depth": 2}, 4, 128, 1024, loop_state={"a": 1})
    assert meta == {"step": 12, "val_bpb": 0.9, "model_config": {"n_layer": 2}, "user_config": {"depth": 2},
                    "device_batch_size": 4, "max_seq_len": 128, "total_batch_size": 1024,
                    "tokenizer_fingerprint": tokenizer.fingerprint(), "loop_state": {"a": 1}}
    assert training.gather_from_ranks({"pq_idx": 3}, cpu_runtime()) == [{"pq_idx": 3}]
    assert training.mean_over_ranks(torch.tensor(2.5), cpu_runtime()) == 2.5
    if os.name == "posix":
        assert training.peak_memory_mib("cpu") > 10  # this process's peak RSS: torch alone is more


def test_runtime_and_wandb_stand_in(monkeypatch):
    rt = training.init_runtime("cpu")
    assert (rt.device_type, rt.device, rt.ddp, rt.rank, rt.world_size, rt.peak_flops) == (
        "cpu", torch.device("cpu"), False, 0, 1, 0.0)
    assert rt.master and rt.synchronize() is None
    assert isinstance(training.init_wandb("dummy", "nanochat", {}, master=True), DummyWandb)
    assert isinstance(training.init_wandb("my-run", "nanochat", {}, master=False), DummyWandb)  # only rank 0 logs
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="pip install wandb, or pass --run dummy"):
        training.init_wandb("my-run", "nanochat", {}, master=True)
