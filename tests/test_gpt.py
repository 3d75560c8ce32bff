"""GPT model: KV-cache inference == full forward, init covers every parameter, counts, optimizer groups, training."""
import sys
import types

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, has_ve
from nanochat.kv_cache import KVCache


# windows S=3 (< T) on layers 0 and 2, full on 1 and 3; GQA; vocab 300 is padded to 320
WINDOWED = GPTConfig(sequence_len=32, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                     window_pattern="SL", short_window=3)


def test_window_sizes_default_and_override():
    assert GPT.__init__ is not None
    with torch.device("meta"):
        assert GPT(GPTConfig(n_layer=6)).window_sizes == [512, 512, 512, 2048, 512, 2048]  # SSSL tiled, last L
        assert GPT(GPTConfig(sequence_len=300, n_layer=2, window_pattern="S")).window_sizes == [128, 300]
        assert GPT(WINDOWED).window_sizes == [3, 32, 3, 32]
    with pytest.raises(ValueError, match="window_pattern"):
        GPT(GPTConfig(window_pattern="SXL"))


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_kv_cache_prefill_chunk_decode_matches_full_forward(grad, build_gpt):
    model = build_gpt(WINDOWED, randomize=True)
    T = 14
    idx = torch.randint(0, WINDOWED.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        full = model(idx)
        kv = KVCache.for_model(model, 2, 20)
        pieces = [model(idx[:, :6], kv_cache=kv), model(idx[:, 6:10], kv_cache=kv)]  # prefill, then a chunk
        for t in range(10, T):
            pieces.append(model(idx[:, t:t + 1], kv_cache=kv))  # token-by-token decode
    assert kv.get_pos() == T
    assert full.shape == (2, T, WINDOWED.vocab_size)
    torch.testing.assert_close(torch.cat(pieces, dim=1).detach(), full.detach(), atol=1e-5, rtol=1e-5)


def test_kv_cache_fan_out_prefill_matches_full_forward(build_gpt):
    """Engine pattern: batch-1 prompt prefill, copied into a 3-row decode cache (K/V and smear state)."""
    model = build_gpt(WINDOWED, seed=3, randomize=True)
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    cont = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        kv1 = KVCache.for_model(model, 1, 7)
        model(prompt, kv_cache=kv1)
        kv3 = KVCache.for_model(model, 3, 12)
        kv3.prefill(kv1)
        steps = [model(cont[:, t:t + 1], kv_cache=kv3) for t in range(4)]
        full = model(torch.cat([prompt.expand(3, -1), cont], dim=1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)
    kv3.reset()
    assert kv3.get_pos() == 0 and kv3.prev_embedding is None


def test_no_grad_forward_matches_autograd_forward_and_tracks_weight_changes(build_gpt):
    """The forward has no inference-only caches: without autograd it must equal the autograd path and see
    in-place updates (optimizer steps) and replaced parameters (load_state_dict(assign=True)) at once."""
    model = build_gpt(WINDOWED, seed=5, randomize=True)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))

    def both():
        with torch.no_grad():
            fast = model(idx)
        slow = model(idx).detach()  # grad enabled: separate Linear modules
        return fast, slow

    fast, slow = both()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.transformer.h[1].attn.c_k.weight.mul_(-2.0)
        model.transformer.h[1].attn.ve_gate.weight.add_(1.0)
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)  # Linear's cached transposed copies
        model.lm_head.weight.add_(0.01)
    fast2, slow2 = both()
    assert (slow2 - slow).abs().max() > 1e-3
    torch.testing.assert_close(fast2, slow2, atol=1e-5, rtol=1e-5)
    sd = {k: v.clone() for k, v in build_gpt(WINDOWED, seed=9, randomize=True).state_dict().items()}
    model.load_state_dict(sd, strict=True, assign=True)
    fast3, slow3 = both()
    assert (slow3 - slow2).abs().max() > 1e-3
    torch.testing.assert_close(fast3, slow3, atol=1e-5, rtol=1e-5)


def test_last_logits_only_matches_last_position_of_full_logits(build_gpt):
    model = build_gpt(WINDOWED, seed=7, randomize=True)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_logits_only=True)
        kv = KVCache.for_model(model, 2, 16)
        cached = model(idx, kv_cache=kv, last_logits_only=True)
    assert last.shape == (2, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=1e-5)
    assert kv.get_pos() == 9


def test_logits_from_matches_the_tail_of_full_logits(build_gpt):
    model = build_gpt(WINDOWED, seed=7, randomize=True)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(idx)
        tail = model(idx, logits_from=5)
        with pytest.raises(ValueError, match="logits_from"):
            model(idx, logits_from=9)
    assert tail.shape == (2, 4, full.size(-1))
    torch.testing.assert_close(tail, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_a_clear_error(build_gpt):
    model = build_gpt(WINDOWED)
    kv = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=kv)


def test_init_weights_writes_every_parameter_and_buffer():
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=32)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), f"{name} was not initialised"
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert 0.0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))


def test_state_dict_names_and_nonpersistent_rotary(build_gpt):
    model = build_gpt(WINDOWED)
    sd = model.state_dict()
    assert "cos" not in sd and "sin" not in sd
    assert model.cos.shape == (1, 320, 1, 16)  # 10x sequence_len, full head_dim
    assert sd["transformer.h.1.attn.ve_gate.weight"].shape == (2, 12)
    assert "transformer.h.0.attn.ve_gate.weight" not in sd
    assert sorted(k for k in sd if k.startswith("value_embeds")) == ["value_embeds.1.weight", "value_embeds.3.weight"]
    assert sd["smear_gate.weight"].shape == (1, 24)
    assert sd["lm_head.weight"].shape == sd["transformer.wte.weight"].shape == (320, 64)


def test_param_counts_and_flops_match_formulas():
    c = GPTConfig(sequence_len=256, vocab_size=300, n_layer=5, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    with torch.device("meta"):
        model = GPT(c)
    V, C, n, D = 320, c.n_embd, c.n_layer, c.n_embd // c.n_head
    kv_dim = c.n_kv_head * D
    n_ve = sum(has_ve(i, n) for i in range(n))
    assert n_ve == 3  # layers 0, 2, 4
    expected = {
        "wte": V * C,
        "value_embeds": n_ve * V * kv_dim,
        "lm_head": V * C,
        "transformer_matrices": n * (2 * C * C + 2 * C * kv_dim + 8 * C * C) + n_ve * 12 * c.n_kv_head,
        "scalars": 2 * n + 26,
    }
    expected["total"] = sum(expected.values())
    assert model.num_params_by_group() == expected
    assert expected["total"] == sum(p.numel() for p in model.parameters())
    assert model.num_scaling_params() == expected["transformer_matrices"] + expected["lm_head"]
    windows = [128, 128, 256, 128, 256]  # SSL tiled, last forced L; S = 256/4 rounded up to 128
    attn = sum(12 * c.n_head * D * min(w, c.sequence_len) for w in windows)
    assert model.estimate_flops() == 6 * (expected["transformer_matrices"] + expected["lm_head"]) + attn


def test_default_d12_counts_match_the_reference_table():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=6, n_kv_head=6, n_embd=768))
    assert round(model.num_params_by_group()["total"] / 1e6, 1) == 286.3
    assert round(model.num_scaling_params() / 1e6, 1) == 110.1


class RecordingOptimizer:
    def __init__(self, param_groups):
        self.param_groups = param_groups


def test_setup_optimizer_groups(monkeypatch, build_gpt):
    fake = types.ModuleType("nanochat.optim")
    fake.MuonAdamW = RecordingOptimizer
    monkeypatch.setitem(sys.modules, "nanochat.optim", fake)
    c = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=192)
    model = build_gpt(c)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1, scalar_lr=0.5)
    groups = opt.param_groups
    scale = (192 / 768) ** -0.5  # = 2
    adamw = [g for g in groups if g["kind"] == "adamw"]
    by_first = {id(g["params"][0]): g for g in adamw}
    lm = by_first[id(model.lm_head.weight)]
    assert lm["lr"] == pytest.approx(0.004 * scale) and lm["betas"] == (0.8, 0.96) and lm["weight_decay"] == 0.01
    wte = by_first[id(model.transformer.wte.weight)]
    assert wte["lr"] == pytest.approx(0.2 * scale) and wte["betas"] == (0.8, 0.995) and wte["weight_decay"] == 0.001
    ve = by_first[id(model.value_embeds["1"].weight)]
    assert ve["lr"] == pytest.approx(0.1 * scale) and ve["weight_decay"] == 0.01
    resid = by_first[id(model.resid_lambdas)]
    assert resid["lr"] == pytest.approx(0.005) and resid["weight_decay"] == 0.05
    x0 = by_first[id(model.x0_lambdas)]
    assert x0["lr"] == 0.5 and x0["betas"] == (0.96, 0.95)
    smear = by_first[id(model.smear_gate.weight)]
    assert {id(p) for p in smear["params"]} == {id(model.smear_gate.weight), id(model.smear_lambda), id(model.backout_lambda)}
    assert smear["lr"] == 0.2
    assert all(g["eps"] == 1e-10 for g in adamw)
    muon = [g for g in groups if g["kind"] == "muon"]
    for g in muon:
        assert len({p.shape for p in g["params"]}) == 1
        assert g["lr"] == 0.02 and g["momentum"] == 0.95 and g["ns_steps"] == 5 and g["beta2"] == 0.9
        assert g["weight_decay"] == 0.1
    muon_ids = {id(p) for g in muon for p in g["params"]}
    assert muon_ids == {id(p) for p in model.transformer.h.parameters()}
    assert id(model.transformer.h[1].attn.ve_gate.weight) in muon_ids
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    assert all(g["initial_lr"] == g["lr"] for g in groups)


def test_loss_matches_cross_entropy_of_logits_and_ignores_minus_one(build_gpt):
    model = build_gpt(WINDOWED, randomize=True)
    idx = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(4))
    targets = idx.roll(-1, dims=1)
    targets[0, 3] = -1
    with torch.no_grad():
        logits = model(idx)
        per_token = model(idx, targets, loss_reduction="none")
        mean = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 300), targets.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token, expected)
    assert per_token[3] == 0
    torch.testing.assert_close(mean, expected.sum() / 15)
    assert logits.abs().max() <= 15.0


def test_tiny_overfit_loss_decreases(build_gpt):
    c = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="L")
    model = build_gpt(c)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.setup_optimizer(unembedding_lr=0.02)  # the real MuonAdamW over nanochat's groups
    losses = []
    for _ in range(20):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    # every parameter got a gradient signal at some point (nothing is disconnected)
    model = build_gpt(c, randomize=True)
    loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_naive_generate_greedy_matches_kv_cache_decode(build_gpt):
    model = build_gpt(WINDOWED, seed=7, randomize=True)
    prompt = [5, 17, 42]
    naive = list(model.generate(prompt, max_tokens=8, temperature=0.0))
    kv = KVCache.for_model(model, 1, 12)
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(8):
            nxt = model(ids, kv_cache=kv)[0, -1].argmax().item()
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    assert naive == out
    sampled = list(model.generate([3], max_tokens=5, temperature=1.0, top_k=5, seed=1))
    assert sampled == list(model.generate([3], max_tokens=5, temperature=1.0, top_k=5, seed=1))
    assert all(0 <= t < 300 for t in sampled)


def test_fp8_linear_matches_quantize_dequantize_math():
    """fp8 GEMMs (torch._scaled_mm also runs on CPU) == fp32 matmuls of the explicitly quantized operands."""
    from nanochat.fp8 import Float8Linear, quantize
    from nanochat.gpt import Linear
    torch.manual_seed(0)
    linear = Linear(64, 32, bias=False)
    f8 = Float8Linear.from_linear(linear)
    assert f8.weight is linear.weight
    x = torch.randn(2, 5, 64, requires_grad=True)
    try:
        y = f8(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm not available on CPU in this torch: {e}")
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    def dequant(t, dtype):
        q, inv_scale = quantize(t, dtype)
        return q.float() * inv_scale

    x2d, g2d = x.detach().reshape(-1, 64), grad_y.reshape(-1, 32)
    w = dequant(linear.weight.detach(), torch.float8_e4m3fn)
    xq, gq = dequant(x2d, torch.float8_e4m3fn), dequant(g2d, torch.float8_e5m2)
    torch.testing.assert_close(y.detach().reshape(-1, 32), xq @ w.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 64), gq @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear.weight.grad, gq.t() @ xq, atol=1e-5, rtol=1e-5)
    assert linear.weight.grad.dtype == torch.float32
    assert (y.detach() - x.detach() @ linear.weight.detach().t()).abs().max() < 0.2  # still the same layer


def test_fp8_conversion_keeps_names_and_filters_small_layers(build_gpt):
    from nanochat.fp8 import Float8Linear, Float8LinearConfig, convert_to_float8_training
    model = build_gpt(GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    names = set(model.state_dict())

    def big_enough(mod, fqn):  # base_train's filter
        return mod.in_features % 16 == 0 and mod.out_features % 16 == 0 and min(mod.in_features, mod.out_features) >= 128
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=big_enough)
    assert set(model.state_dict()) == names
    assert isinstance(model.lm_head, Float8Linear) and isinstance(model.transformer.h[0].mlp.c_fc, Float8Linear)
    assert not isinstance(model.transformer.h[1].attn.ve_gate, Float8Linear)
    assert not isinstance(model.smear_gate, Float8Linear)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        loss = model(idx, idx)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm not available on CPU in this torch: {e}")
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="tensorwise"):
        Float8LinearConfig.from_recipe_name("rowwise")


def test_inference_and_eval_never_import_dynamo():
    """torch._dynamo costs seconds of import: a process that only builds, scores or samples a model (chat_cli,
    the server, base_eval) must not pull it in -- e.g. through a module-level torch.compiler.disable."""
    import subprocess
    code = (
        "import sys, torch\n"
        "from nanochat.gpt import GPT, GPTConfig\n"
        "from nanochat import engine, checkpoint_manager, loss_eval\n"
        "with torch.device('meta'):\n"
        "    m = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))\n"
        "m.to_empty(device='cpu'); m.init_weights(); m.eval()\n"
        "idx = torch.randint(0, 64, (1, 8))\n"
        "with torch.no_grad():\n"
        "    m(idx, targets=idx, loss_reduction='none'); m(idx, targets=idx)\n"
        "list(m.generate(idx[0].tolist(), max_tokens=3))\n"
        "print('torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_kv_cache_in_another_dtype_is_a_clear_error(build_gpt):
    from nanochat.common import COMPUTE_DTYPE
    model = build_gpt(WINDOWED, seed=1, randomize=True)
    c = model.config
    other = torch.bfloat16 if COMPUTE_DTYPE == torch.float32 else torch.float32
    kv = KVCache(1, c.n_kv_head, 8, c.n_embd // c.n_head, c.n_layer, "cpu", other)
    with pytest.raises(TypeError, match="KVCache.for_model"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=kv)
