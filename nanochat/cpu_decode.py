"""
One-token decode step for CPU inference: GPT.forward(idx (B, 1), kv_cache) as straight-line tensor code.

Why a second path: on a CPU, a one-token step of a small model spends more time getting from one tiny op to
the next than computing (measured on a 2-core EPYC: a d4 model with 64 channels and a 64-token vocab -- almost
no arithmetic -- took 2.2 ms per step through the module tree, as long as streaming a d4's 21 MB of weights).
Here the same math runs with no nn.Module calls, no per-op weight-cache checks, constants held as 0-d tensors
(a Python float in an op costs a scalar-to-tensor conversion each time) and the fewest ops we could find.
GPT.forward sends CPU, no-grad, single-token steps with a warm cache here; tests check it against the
full-sequence forward and the module path.

The weights are gathered once per set of model weights and looked up once per KV cache (one generation):
weights must not change while a cache is in use, which holds anyway (cached K/V were computed with the old ones).

quantize="int8" (Engine(..., quantize="int8")): the matrices are stored as int8 with one scale per output
channel and multiplied with torch._weight_int8pack_mm (bf16 activations, the kernel torchao and gpt-fast use on
CPU). A one-token step mostly streams weights from memory, so a quarter of the bytes is most of the win: d4 matmuls
0.5 ms vs 1.6-1.9 ms per step here. Lossy (logits move by ~1 % of their range), so it is opt-in.
"""

import torch



class Int8Matrix:
    """A weight stored as int8 rows (out, in) with one bf16 scale per row; x @ W^T through the int8 CPU kernel."""

    def __init__(self, weight_t):
        w = weight_t.t().float()                                   # (out, in) from the (in, out) fp32-path layout
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)

    def matmul(self, x):
        out = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.q, self.scales)
        return out.view(*x.shape[:-1], out.size(-1)).to(x.dtype)


def _mm(x, weight):
    return x @ weight if isinstance(weight, torch.Tensor) else weight.matmul(x)


QUANTIZE_CHOICES = (None, "int8")


class DecodeWeights:
    """The model's weights in the layout one-token steps want, plus constants as 0-d tensors."""

    def __init__(self, model, dtype, quantize=None):
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if quantize is not None and not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError("quantize='int8' needs torch._weight_int8pack_mm (PyTorch >= 2.3); upgrade torch "
                               "or run without quantization")
        matrix = Int8Matrix if quantize == "int8" else (lambda weight_t: weight_t)
        config = model.config
        self.model = model
        self.dtype = dtype
        self.quantize = quantize
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab_size = config.vocab_size
        self.window_sizes = list(model.window_sizes)
        self.backout_layer = model.backout_layer

        def const(value):
            return torch.tensor(value, dtype=dtype)

        self.layers = []
        for i, block in enumerate(model.transformer.h):
            attn, mlp = block.attn, block.mlp
            ve = model.value_embeds[str(i)].weight if str(i) in model.value_embeds else None
            self.layers.append(dict(
                resid=const(model.resid_lambdas[i].item()), x0=const(model.x0_lambdas[i].item()),
                qkvg=matrix(attn._fused_input_weight(dtype)), proj=matrix(attn.c_proj._transposed_weight(dtype)),
                fc=matrix(mlp.c_fc._transposed_weight(dtype)), mlp_proj=matrix(mlp.c_proj._transposed_weight(dtype)),
                value_embed=None if ve is None else ve.to(dtype), softmax_scale=attn.softmax_scale,
            ))
        self.wte = model.transformer.wte.weight.to(dtype)
        self.lm_head = matrix(model.lm_head._transposed_weight(dtype))
        self.smear_gate = model.smear_gate._transposed_weight(dtype)
        self.smear_lambda = const(model.smear_lambda.item())
        self.backout_lambda = const(model.backout_lambda.item())
        self.cos, self.sin = model.cos[0, :, 0], model.sin[0, :, 0]  # (T, D)
        self.eps = const(torch.finfo(dtype).eps)
        from nanochat.gpt import SOFTCAP  # not at the top: nanochat.gpt imports this module
        self.inv_softcap = torch.tensor(1.0 / SOFTCAP)
        self.softcap = torch.tensor(SOFTCAP)
        self.smear_channels = model.smear_gate.in_features
        self.three = const(3.0)


def _norm(x, eps):
    # parameter-free RMSNorm over the last dim, same formula as nanochat.gpt.norm
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))


def weights_for(model, kv_cache, dtype, quantize=None):
    """The DecodeWeights for this cache's generation, attached to the cache on first use. The model keeps one
    snapshot per (dtype, quantize), rebuilt only when its weights changed (checked once per cache, not per step).
    quantize=None takes whatever is attached already (the Engine attaches quantized weights before decoding)."""
    weights = getattr(kv_cache, "decode_weights", None)
    if (weights is None or weights.model is not model or weights.dtype != dtype
            or (quantize is not None and weights.quantize != quantize)):
        from nanochat.gpt import _key_matches, _weights_key  # not at the top: nanochat.gpt imports this module
        key = _weights_key(list(model.parameters()))
        snapshots = model.__dict__.setdefault("_decode_weights", {})  # plain attribute: not a module or buffer
        weights, cached_key = snapshots.get((dtype, quantize), (None, None))
        if weights is None or not _key_matches(cached_key, key):
            weights = DecodeWeights(model, dtype, quantize=quantize)
            snapshots[(dtype, quantize)] = (weights, key)
        kv_cache.decode_weights = weights
    return weights


def decode_step(model, idx, kv_cache, dtype):
    """Logits (B, 1, vocab_size) in fp32 for one new token per row; writes K/V and advances the cache.
    Needs kv_cache.prev_embedding (the cache holds at least one token)."""
    w = weights_for(model, kv_cache, dtype)
    B = idx.size(0)
    H, H_kv, D = w.n_head, w.n_kv_head, w.head_dim
    pos = kv_cache.get_pos()
    cos, sin = w.cos[pos], w.sin[pos]

    x = _norm(torch.nn.functional.embedding(idx, w.wte), w.eps)    # (B, 1, C)
    prev = kv_cache.prev_embedding
    kv_cache.prev_embedding = x
    gate = torch.sigmoid(x[..., :w.smear_channels] @ w.smear_gate).mul_(w.smear_lambda)
    x = torch.addcmul(x, gate, prev)
    x0 = x
    x_backout = None
    for i, layer in enumerate(w.layers):
        x = torch.addcmul(x * layer["resid"], x0, layer["x0"])
        qkvg = _mm(_norm(x, w.eps), layer["qkvg"])                    # (B, 1, (H + 2 H_kv) D [+ H_kv])
        qk = qkvg[..., :(H + H_kv) * D].view(B, H + H_kv, D)
        qk = _norm(torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin), w.eps)
        v = qkvg[..., (H + H_kv) * D:(H + 2 * H_kv) * D].view(B, H_kv, D)
        if layer["value_embed"] is not None:
            gate = torch.sigmoid(qkvg[..., (H + 2 * H_kv) * D:]).view(B, H_kv, 1).mul_(w.three)
            v = torch.addcmul(v, gate, torch.nn.functional.embedding(idx, layer["value_embed"]).view(B, H_kv, D))
        k_cache, v_cache = kv_cache.get_layer_cache(i)             # (B, T_max, H_kv, D)
        k_cache[:, pos] = qk[:, H:]
        v_cache[:, pos] = v
        start = max(0, pos + 1 - (w.window_sizes[i] + 1))
        keys = k_cache[:, start:pos + 1].transpose(1, 2)           # (B, H_kv, Tk, D)
        values = v_cache[:, start:pos + 1].transpose(1, 2)
        # the H // H_kv query heads sharing a kv head act as that head's query positions: no mask, no repeat
        y = torch.nn.functional.scaled_dot_product_attention(
            qk[:, :H].view(B, H_kv, H // H_kv, D), keys, values, scale=layer["softmax_scale"])
        x = x + _mm(y.view(B, 1, H * D), layer["proj"])
        h = _mm(_norm(x, w.eps), layer["fc"]).relu_().square_()
        x = x + _mm(h, layer["mlp_proj"])
        if i == w.backout_layer:
            x_backout = x
    kv_cache.advance(1)
    if x_backout is not None:
        x = torch.addcmul(x, x_backout, w.backout_lambda, value=-1)
    logits = _mm(_norm(x, w.eps), w.lm_head)[..., :w.vocab_size].float()
    return logits.mul_(w.inv_softcap).tanh_().mul_(w.softcap)
