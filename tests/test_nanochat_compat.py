"""
nanochat checkpoint compatibility: a checkpoint in nanochat's format (state-dict names/shapes and meta JSON
fields written out here from nanochat's layout, not from our model) loads strictly into our GPT, and our
logits equal a plain functional re-statement of nanochat's forward math written in this file.
"""
import json
import math

import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig


MODEL_CONFIG = {"sequence_len": 256, "vocab_size": 100, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                "window_pattern": "SL"}
PADDED_VOCAB = 128   # vocab padded up to a multiple of 64
VE_LAYERS = [0, 2]   # alternating layers ending with the last one
WINDOWS = [128, 256, 256]  # S = 256 / 4 rounded up to 128; L = sequence_len; last layer always L
BACKOUT_LAYER = 1    # n_layer // 2


def synthesize_nanochat_state_dict(seed=0):
    c = MODEL_CONFIG
    g = torch.Generator().manual_seed(seed)
    C, H, H_kv = c["n_embd"], c["n_head"], c["n_kv_head"]
    D = C // H

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "resid_lambdas": 1.0 + randn(3, std=0.1),
        "x0_lambdas": 0.1 + randn(3, std=0.1),
        "smear_lambda": torch.tensor([0.7]),
        "backout_lambda": torch.tensor([0.3]),
        "transformer.wte.weight": randn(PADDED_VOCAB, C, std=1.0),
        "lm_head.weight": randn(PADDED_VOCAB, C, std=0.3),
        "smear_gate.weight": randn(1, 24, std=0.5),
    }
    for i in range(3):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = randn(H * D, C, std=C ** -0.5)
        sd[p + "attn.c_k.weight"] = randn(H_kv * D, C, std=C ** -0.5)
        sd[p + "attn.c_v.weight"] = randn(H_kv * D, C, std=C ** -0.5)
        sd[p + "attn.c_proj.weight"] = randn(C, C, std=C ** -0.5)
        sd[p + "mlp.c_fc.weight"] = randn(4 * C, C, std=C ** -0.5)
        sd[p + "mlp.c_proj.weight"] = randn(C, 4 * C, std=(4 * C) ** -0.5)
        if i in VE_LAYERS:
            sd[p + "attn.ve_gate.weight"] = randn(H_kv, 12, std=0.5)
            sd[f"value_embeds.{i}.weight"] = randn(PADDED_VOCAB, H_kv * D, std=0.5)
    return sd


def nanochat_meta(step):
    return {
        "step": step, "val_bpb": 3.1, "model_config": MODEL_CONFIG,
        "user_config": {"depth": 3, "aspect_ratio": 64, "head_dim": 8, "max_seq_len": 256, "window_pattern": "SL"},
        "device_batch_size": 2, "max_seq_len": 256, "total_batch_size": 512,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 1, "epoch": 1},
        "loop_state": {"min_val_bpb": 3.1, "smooth_train_loss": 4.2, "total_training_time": 1.0},
    }


# --- nanochat's forward, restated from its formulas ----------------------------------------------------------

def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def rotate(x, positions, base=100000.0):
    """Half-split rotary by -theta: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos), theta = t * base^(-2j/D)."""
    D = x.size(-1)
    j = torch.arange(D // 2, dtype=torch.float32)
    theta = positions.float()[:, None] * base ** (-2 * j / D)  # (T, D/2)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]  # broadcast over heads
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def reference_logits(sd, ids):
    c = MODEL_CONFIG
    C, H, H_kv = c["n_embd"], c["n_head"], c["n_kv_head"]
    D = C // H
    T = len(ids)
    idx = torch.tensor(ids)
    x = rms(sd["transformer.wte.weight"][idx])                                     # (T, C)
    gate = sd["smear_lambda"] * torch.sigmoid(x[:, :24] @ sd["smear_gate.weight"].T)  # (T, 1)
    x = torch.cat([x[:1], x[1:] + gate[1:] * x[:-1]])
    x0 = x
    pos = torch.arange(T)
    visible_base = pos[None, :] <= pos[:, None]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(T, H_kv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(T, H_kv, D)
        if i in VE_LAYERS:
            g = 3 * torch.sigmoid(h[:, :12] @ sd[p + "attn.ve_gate.weight"].T)      # (T, H_kv)
            v = v + g[:, :, None] * sd[f"value_embeds.{i}.weight"][idx].view(T, H_kv, D)
        q = rms(rotate(q, pos)) * 1.2
        k = rms(rotate(k, pos)) * 1.2
        visible = visible_base & (pos[:, None] - pos[None, :] <= WINDOWS[i])
        heads = []
        for head in range(H):
            kv_head = head // (H // H_kv)
            scores = (q[:, head] @ k[:, kv_head].T) / math.sqrt(D)
            scores = scores.masked_fill(~visible, float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, kv_head])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + F.relu(h @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == BACKOUT_LAYER:
            x_mid = x
    x = rms(x - sd["backout_lambda"] * x_mid)
    logits = (x @ sd["lm_head.weight"].T)[:, :c["vocab_size"]]
    return 15 * torch.tanh(logits / 15)


# --- the test ---------------------------------------------------------------------------------------------------

def test_nanochat_checkpoint_loads_strictly_and_reproduces_reference_math(tmp_path, build_gpt):
    ckpt_dir = tmp_path / "base_checkpoints" / "d3"
    ckpt_dir.mkdir(parents=True)
    sd = synthesize_nanochat_state_dict()
    torch.save(sd, ckpt_dir / "model_000005.pt")
    (ckpt_dir / "meta_000005.json").write_text(json.dumps(nanochat_meta(5)))

    meta = json.loads((ckpt_dir / "meta_000005.json").read_text())
    model = build_gpt(GPTConfig(**meta["model_config"]))
    loaded = torch.load(ckpt_dir / "model_000005.pt", map_location="cpu")
    model.load_state_dict(loaded, strict=True, assign=True)
    assert set(model.state_dict()) == set(sd)

    ids = torch.randint(0, 100, (150,), generator=torch.Generator().manual_seed(1)).tolist()  # 150 > S window
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    expected = reference_logits(sd, ids)
    assert ours.shape == (150, 100)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)

    # and the round trip: our state dict is nanochat's (same names, shapes and values)
    ours_sd = model.state_dict()
    for name, tensor in sd.items():
        assert ours_sd[name].shape == tensor.shape and torch.equal(ours_sd[name].float(), tensor), name
