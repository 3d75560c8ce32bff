"""Checkpoints: round trip, atomic saves (a failed save keeps the last good checkpoint; killed saves are in
test_reliability), finding tags/steps, and loading checkpoints in nanochat's own format (prefixed keys, bf16 tables,
old configs)."""
import json
import os
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPTConfig

VOCAB_SIZE = 300


def tiny_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}


def save_step(ckpt_dir, step, seed=None, meta_extra=None):
    model = tiny_state(step if seed is None else seed)
    optim = {"state": {0: {"m": model["w"] * 2}}, "param_groups": [{"lr": 0.1, "kind": "muon"}]}
    meta = {"step": step, "val_bpb": None, "loop_state": {"min_val_bpb": float("inf")}, **(meta_extra or {})}
    cm.save_checkpoint(str(ckpt_dir), step, model, optim, meta)
    return model, optim, meta


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# raw save / load

def test_round_trip_and_layout(tmp_path):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    model, optim, meta = save_step(ckpt, 7)
    assert sorted(os.listdir(ckpt)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]
    m, o, mt = cm.load_checkpoint(str(ckpt), 7, "cpu", load_optimizer=True)
    assert_same_state(m, model)
    assert torch.equal(o["state"][0]["m"], optim["state"][0]["m"]) and o["param_groups"] == optim["param_groups"]
    assert mt == meta and mt["loop_state"]["min_val_bpb"] == float("inf")  # nanochat writes Infinity
    assert cm.load_checkpoint(str(ckpt), 7, "cpu")[1] is None


def test_missing_step_and_missing_optimizer_shard_explain_themselves(tmp_path):
    save_step(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match=r"step 4.*\[3\]"):
        cm.load_checkpoint(str(tmp_path), 4, "cpu")
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=1)


@pytest.mark.parametrize("fail_on_call", [1, 2])  # 1: the model file fails, 2: the optimizer shard fails
def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, fail_on_call):
    good_model, _, good_meta = save_step(tmp_path, 3)
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_call:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        save_step(tmp_path, 6)
    monkeypatch.setattr(torch, "save", real_save)
    assert cm.find_last_step(str(tmp_path)) == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f], "temp files must be cleaned up"
    assert not os.path.exists(tmp_path / "meta_000006.json")
    m, _, meta = cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True)
    assert_same_state(m, good_model) and meta == good_meta


def test_find_last_step_and_largest_model(tmp_path):
    root = tmp_path / "base_checkpoints"
    for step in (5, 200, 40):
        save_step(root / "d4", step)
    (root / "d4" / "model_000900_backup.pt").write_bytes(b"x")  # stray file (nanochat bug report)
    (root / "d4" / "model_000500.pt").write_bytes(b"x")          # weights without meta = unfinished save
    assert cm.find_last_step(str(root / "d4")) == 200
    assert cm.available_steps(str(root / "d4")) == [5, 40, 200]
    save_step(root / "d12", 1)
    (root / "d30").mkdir()  # no checkpoint inside: not a candidate
    assert cm.find_largest_model(str(root)) == "d12"
    # without d<N> tags the most recently modified tag wins
    other = tmp_path / "other"
    save_step(other / "alpha", 1)
    save_step(other / "beta", 1)
    os.utime(other / "alpha", (time.time() + 10, time.time() + 10))
    assert cm.find_largest_model(str(other)) == "alpha"
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(str(root / "d30"))
    with pytest.raises(ValueError, match="Unknown checkpoint source"):
        cm.load_model("nope", "cpu", "eval")


# -----------------------------------------------------------------------------
# building models (needs the GPT and a tokenizer: conftest's base holds tiny_tokenizer, of VOCAB_SIZE tokens)

NANOCHAT_MODEL_CONFIG = {"sequence_len": 32, "vocab_size": VOCAB_SIZE, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
                         "n_embd": 64, "window_pattern": "L"}


def write_nanochat_checkpoint(base, tag, step, state_dict, model_config):
    """Exactly what nanochat's base_train writes (plain torch.save + json, all of its meta fields)."""
    d = os.path.join(base, "base_checkpoints", tag)
    os.makedirs(d, exist_ok=True)
    torch.save(state_dict, os.path.join(d, f"model_{step:06d}.pt"))
    user_config = {"run": "dummy", "device_type": "cuda", "fp8": False, "fp8_recipe": "tensorwise", "depth": 2,
                   "aspect_ratio": 64, "head_dim": 32, "max_seq_len": 32, "window_pattern": "L",
                   "num_iterations": 20, "target_flops": -1.0, "target_param_data_ratio": 12,
                   "device_batch_size": 4, "total_batch_size": 512, "embedding_lr": 0.3, "unembedding_lr": 0.008,
                   "weight_decay": 0.28, "matrix_lr": 0.02, "scalar_lr": 0.5, "warmup_steps": 40,
                   "warmdown_ratio": 0.65, "final_lr_frac": 0.05, "resume_from_step": -1, "eval_every": -1,
                   "eval_tokens": 41943040, "core_metric_every": -1, "core_metric_max_per_task": 500,
                   "sample_every": -1, "save_every": -1, "model_tag": tag}
    meta = {"step": step, "val_bpb": None, "model_config": model_config, "user_config": user_config,
            "device_batch_size": 4, "max_seq_len": 32, "total_batch_size": 512,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 4, "epoch": 1},
            "loop_state": {"min_val_bpb": float("inf"), "smooth_train_loss": 7.89, "total_training_time": 0.55}}
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta, f, indent=2)


def test_load_nanochat_format_checkpoint(base, build_gpt):
    """A GPU-trained nanochat checkpoint: torch.compile's _orig_mod. prefixes and bf16 embedding tables.
    load_model must pick the tag and step by itself and give the same logits as the original model."""
    model = build_gpt(GPTConfig(**NANOCHAT_MODEL_CONFIG), randomize=True)
    sd = {}
    for k, v in model.state_dict().items():
        if "wte" in k or "value_embeds" in k:
            v = v.to(torch.bfloat16)  # nanochat keeps embedding tables in bf16 on GPU
        sd["_orig_mod." + k] = v.clone()
    with torch.no_grad():  # what the model holds after the bf16 round trip
        for k, p in model.state_dict().items():
            if "wte" in k or "value_embeds" in k:
                p.copy_(p.to(torch.bfloat16).float())
    write_nanochat_checkpoint(base, "d2", 20, sd, NANOCHAT_MODEL_CONFIG)
    write_nanochat_checkpoint(base, "d2", 10, sd, NANOCHAT_MODEL_CONFIG)
    loaded, tokenizer, meta = cm.load_model("base", torch.device("cpu"), phase="eval")
    assert meta["step"] == 20 and not loaded.training
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = torch.randint(0, VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-5)
    train_model, _, _ = cm.load_model("base", "cpu", "train", model_tag="d2", step=10)
    assert train_model.training


def test_old_checkpoint_without_window_pattern_or_lambdas(base, build_gpt):
    config = {k: v for k, v in NANOCHAT_MODEL_CONFIG.items() if k != "window_pattern"}
    model = build_gpt(GPTConfig(**NANOCHAT_MODEL_CONFIG), randomize=True)
    sd = {k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    write_nanochat_checkpoint(base, "old", 5, sd, config)
    loaded, _, _ = cm.load_model("base", "cpu", "eval", model_tag="old")
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas, torch.ones(2)) and torch.equal(loaded.x0_lambdas, torch.zeros(2))


def test_vocab_mismatch_is_a_clear_error(base, build_gpt):
    config = dict(NANOCHAT_MODEL_CONFIG, vocab_size=VOCAB_SIZE + 64)
    write_nanochat_checkpoint(base, "d2", 1, build_gpt(GPTConfig(**config), randomize=True).state_dict(), config)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB_SIZE + 64}.*{VOCAB_SIZE} tokens"):
        cm.load_model("base", "cpu", "eval")


def test_our_save_loads_through_load_model(base, build_gpt):
    model = build_gpt(GPTConfig(**NANOCHAT_MODEL_CONFIG), randomize=True)
    d = os.path.join(base, "chatsft_checkpoints", "d2")
    cm.save_checkpoint(d, 4, model.state_dict(), None, {"step": 4, "model_config": NANOCHAT_MODEL_CONFIG})
    loaded, _, _ = cm.load_model("sft", "cpu", "eval")
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_meta_model_config_stays_readable_by_nanochat(tmp_path):
    """nanochat builds GPTConfig(**model_config): our extra fields are written only when they differ from
    their defaults, and read back as defaults when absent."""
    import json as _json
    from nanochat.checkpoint_manager import save_checkpoint, patch_model_config, NANOCHAT_CONFIG_FIELDS
    base = dict(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    save_checkpoint(str(tmp_path), 1, {}, None, {"model_config": {**base, "short_window": 0, "rope_base": 100000.0}})
    saved = _json.loads((tmp_path / "meta_000001.json").read_text())["model_config"]
    assert set(saved) == set(NANOCHAT_CONFIG_FIELDS)
    from nanochat.gpt import GPTConfig
    assert GPTConfig(**patch_model_config(saved)).rope_base == 100000.0
    save_checkpoint(str(tmp_path), 2, {}, None, {"model_config": {**base, "short_window": 0, "rope_base": 4e5}})
    saved = _json.loads((tmp_path / "meta_000002.json").read_text())["model_config"]
    assert saved["rope_base"] == 4e5 and "short_window" not in saved
