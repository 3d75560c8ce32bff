"""
One-token decode steps for CPU inference: GPT.forward(idx (B, 1), kv_cache) restated as straight-line tensor code
over a snapshot of the model's weights. The Engine owns one (nanochat.engine); nothing here touches the model.

Why a second path: on a CPU, a one-token step of a small model spends more time getting from one tiny op to the
next than computing, and it is bound by streaming the weights. So the decoder
- runs the same math with no nn.Module calls and the fewest ops (constants as 0-d tensors: a Python float in an
  op costs a scalar-to-tensor conversion each time);
- keeps every matrix as a contiguous copy of its transpose, x @ W^T as x @ Wt, the layout MKL's matrix-vector
  product streams fastest, and c_q | c_k | c_v | ve_gate stacked into one matrix (one matmul for the attention's
  input side, and rotary + norm on q and k together).
Rows may sit at different positions (a RaggedKVCache, for continuous batching): rotary, the K/V write and a mask
then follow each row's own length. `prefill` runs a prompt (or a chunk of one) of any length from the same
weights, so a prompt's first token does not pay for casting the fp32 master weights either.
Measurements: dev/PERF.md ("CPU decode"); tests against the model's forward: tests/test_cpu_decode.py.

The snapshot is taken when the decoder is built. Whoever changes the weights afterwards (an optimizer step,
load_state_dict) says so: Engine.weights_changed() drops the decoder and the next generate builds a new one.
As a guard against a forgotten call, `is_current()` compares parameter identities and a strided sample of
every snapshotted matrix (cheap, and any optimizer update moves those samples); it is a guard, not a proof.

quantize="int8": matrices stored as int8 with one scale per output channel and multiplied with
torch._weight_int8pack_mm (bf16 activations, the kernel torchao and gpt-fast use on CPU): a quarter of the bytes
to stream per token. Lossy (logits move by ~1 % of their range), so it is opt-in.
"""

import torch
import torch.nn.functional as F

from nanochat.attention import attention_with_kvcache
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import SOFTCAP, VE_GATE_CHANNELS

QUANTIZE_CHOICES = (None, "int8")
_FINGERPRINT_SAMPLES = 64  # elements per snapshotted matrix compared by is_current()


class Int8Matrix:
    """A weight (out, in) stored as int8 rows with one bf16 scale per row; x @ W^T through the int8 CPU kernel."""

    def __init__(self, weight):
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)

    def matmul(self, x):
        out = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.q, self.scales)
        return out.view(*x.shape[:-1], out.size(-1)).to(x.dtype)


def _mm(x, weight):
    return x @ weight if isinstance(weight, torch.Tensor) else weight.matmul(x)


def _norm(x, eps):
    # parameter-free RMSNorm over the last dim, the formula of nanochat.gpt.norm
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))


def _fingerprint(weights):
    return [w.detach().reshape(-1)[::max(1, w.numel() // _FINGERPRINT_SAMPLES)].clone() for w in weights]


class CPUDecoder:
    """Decode steps for one model: `logits = decoder.step(idx, kv_cache)` equals model(idx, kv_cache=kv_cache)
    for idx (B, 1) once the cache holds at least one token (it needs the smear state of the previous token), and
    `decoder.prefill(idx, kv_cache)` equals model(idx, kv_cache=kv_cache, last_logits_only=True) for a prompt (or
    a chunk of one) of any length, from the same pre-cast weights."""

    def __init__(self, model, quantize=None, dtype=COMPUTE_DTYPE):
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if quantize is not None and not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError("quantize='int8' needs torch._weight_int8pack_mm (PyTorch >= 2.3); upgrade torch "
                               "or run without quantization")
        if model.get_device().type != "cpu":
            raise ValueError(f"CPUDecoder is for a model on the CPU (this one is on {model.get_device()})")
        config = model.config
        self.quantize, self.dtype = quantize, dtype
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab_size = config.vocab_size
        self.window_sizes = list(model.window_sizes)
        self.backout_layer = model.backout_layer
        self._snapshot(model)
        self._watched = list(model.parameters())
        self._fingerprint = _fingerprint(self._watched)

    def _matrix(self, weight):
        """(out, in) weight -> what _mm multiplies by: an int8 matrix, or the transposed copy in the compute dtype."""
        weight = weight.detach()
        if self.quantize == "int8":
            return Int8Matrix(weight)
        return weight.to(self.dtype).t().contiguous()

    def _snapshot(self, model):
        """Copy the weights into the decode layout."""
        def const(value):
            return torch.tensor(value, dtype=self.dtype)

        self.layers = []
        for i, block in enumerate(model.transformer.h):
            attn, mlp = block.attn, block.mlp
            inputs = [attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]
            if attn.ve_gate is not None:  # padded to the full input width: its rows read the first channels only
                inputs.append(F.pad(attn.ve_gate.weight.detach(), (0, attn.c_q.in_features - VE_GATE_CHANNELS)))
            value_embed = model.value_embeds[str(i)].weight if str(i) in model.value_embeds else None
            self.layers.append(dict(
                resid=const(model.resid_lambdas[i].item()), x0=const(model.x0_lambdas[i].item()),
                qkvg=self._matrix(torch.cat([w.detach() for w in inputs])), proj=self._matrix(attn.c_proj.weight),
                fc=self._matrix(mlp.c_fc.weight), mlp_proj=self._matrix(mlp.c_proj.weight),
                value_embed=None if value_embed is None else value_embed.detach().to(self.dtype),
                softmax_scale=attn.softmax_scale,
            ))
        self.wte = model.transformer.wte.weight.detach().to(self.dtype)
        self.lm_head = self._matrix(model.lm_head.weight)
        self.smear_gate = model.smear_gate.weight.detach().to(self.dtype).t().contiguous()
        self.smear_channels = model.smear_gate.in_features
        self.smear_lambda = const(model.smear_lambda.item())
        self.backout_lambda = const(model.backout_lambda.item())
        self.cos, self.sin = model.cos[0, :, 0], model.sin[0, :, 0]  # (T, D)
        self.eps = const(torch.finfo(self.dtype).eps)
        self.inv_softcap, self.softcap = torch.tensor(1.0 / SOFTCAP), torch.tensor(SOFTCAP)
        self.three = const(3.0)

    def is_current(self, model):
        """False when the model's parameters were replaced or (judging by a sample) modified since the snapshot."""
        params = list(model.parameters())
        if len(params) != len(self._watched) or any(a is not b for a, b in zip(params, self._watched)):
            return False
        return all(torch.equal(a, b) for a, b in zip(_fingerprint(params), self._fingerprint))

    @torch.inference_mode()
    def step(self, idx, kv_cache):
        """Logits (B, 1, vocab_size) in fp32 for one new token per row; writes K/V and advances the cache."""
        if kv_cache.prev_embedding is None:
            raise ValueError("CPUDecoder.step continues a sequence: prefill the cache with the model first")
        B = idx.size(0)
        H, D = self.n_head, self.head_dim
        pos = kv_cache.get_pos()
        row_positions = kv_cache.row_positions()  # rows at different positions (continuous batching), or None
        if row_positions is None:
            cos, sin = self.cos[pos], self.sin[pos]
        else:
            cos, sin = self.cos[row_positions][:, None], self.sin[row_positions][:, None]  # (B, 1, D)

        x = _norm(F.embedding(idx, self.wte), self.eps)                  # (B, 1, C)
        prev = kv_cache.prev_embedding
        kv_cache.prev_embedding = x
        gate = torch.sigmoid(x[..., :self.smear_channels] @ self.smear_gate).mul_(self.smear_lambda)
        x = torch.addcmul(x, gate, prev)
        x0 = x
        x_backout = None
        for i, layer in enumerate(self.layers):
            x = torch.addcmul(x * layer["resid"], x0, layer["x0"])
            qk, v = self._attention_inputs(layer, x, idx, cos, sin, (B,))
            attend = self._attend if row_positions is None else self._attend_ragged
            x = x + _mm(attend(i, layer, qk, v, kv_cache, pos).view(B, 1, H * D), layer["proj"])
            x = self._mlp(layer, x)
            if i == self.backout_layer:
                x_backout = x
        kv_cache.advance(1)
        if x_backout is not None:
            x = torch.addcmul(x, x_backout, self.backout_lambda, value=-1)
        logits = _mm(_norm(x, self.eps), self.lm_head)[..., :self.vocab_size].float()
        return logits.mul_(self.inv_softcap).tanh_().mul_(self.softcap)

    @torch.inference_mode()
    def prefill(self, idx, kv_cache):
        """Logits (B, 1, vocab_size) in fp32 of the last of T new tokens per row; writes their K/V and advances the
        cache. Rows at one position only (a prompt is prefilled alone, then fanned out)."""
        if kv_cache.row_positions() is not None:
            raise ValueError("CPUDecoder.prefill takes a cache whose rows share one position; prefill rows alone")
        B, T = idx.shape
        H, D = self.n_head, self.head_dim
        pos = kv_cache.get_pos()
        cos, sin = self.cos[pos:pos + T, None], self.sin[pos:pos + T, None]  # (T, 1, D)

        x = _norm(F.embedding(idx, self.wte), self.eps)                  # (B, T, C)
        prev = kv_cache.prev_embedding
        kv_cache.prev_embedding = x[:, -1:]
        # the first token of a sequence has no predecessor: a zero one adds nothing
        x_prev = torch.cat([torch.zeros_like(x[:, :1]) if prev is None else prev, x[:, :-1]], dim=1)
        gate = torch.sigmoid(x[..., :self.smear_channels] @ self.smear_gate).mul_(self.smear_lambda)
        x = torch.addcmul(x, gate, x_prev)
        x0 = x
        x_backout = None
        for i, layer in enumerate(self.layers):
            x = torch.addcmul(x * layer["resid"], x0, layer["x0"])
            qk, v = self._attention_inputs(layer, x, idx, cos, sin, (B, T))
            k_cache, v_cache = kv_cache.get_layer_cache(i)
            y = attention_with_kvcache(qk[:, :, :H], k_cache, v_cache, qk[:, :, H:], v, kv_cache.cache_seqlens, pos,
                                       self.window_sizes[i], scale=layer["softmax_scale"])
            x = x + _mm(y.reshape(B, T, H * D), layer["proj"])
            x = self._mlp(layer, x)
            if i == self.backout_layer:
                x_backout = x
        kv_cache.advance(T)
        x = x[:, -1:]
        if x_backout is not None:
            x = torch.addcmul(x, x_backout[:, -1:], self.backout_lambda, value=-1)
        logits = _mm(_norm(x, self.eps), self.lm_head)[..., :self.vocab_size].float()
        return logits.mul_(self.inv_softcap).tanh_().mul_(self.softcap)

    def _attention_inputs(self, layer, x, idx, cos, sin, lead):
        """One matmul for q | k | v | the value-embedding gate; q and k get rotary and norm together, v its value
        embedding. Returns qk (*lead, H + H_kv, D) and v (*lead, H_kv, D); lead is (B,) for a step, (B, T) else."""
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        qkvg = _mm(_norm(x, self.eps), layer["qkvg"])                       # (..., (H + 2 H_kv) D [+ H_kv])
        qk = qkvg[..., :(H + H_kv) * D].view(*lead, H + H_kv, D)
        qk = _norm(torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin), self.eps)
        v = qkvg[..., (H + H_kv) * D:(H + 2 * H_kv) * D].view(*lead, H_kv, D)
        if layer["value_embed"] is not None:
            gate = torch.sigmoid(qkvg[..., (H + 2 * H_kv) * D:]).view(*lead, H_kv, 1).mul_(self.three)
            v = torch.addcmul(v, gate, F.embedding(idx, layer["value_embed"]).view(*lead, H_kv, D))
        return qk, v

    def _mlp(self, layer, x):
        h = _mm(_norm(x, self.eps), layer["fc"]).relu_().square_()
        return x + _mm(h, layer["mlp_proj"])

    def _attend(self, i, layer, qk, v, kv_cache, pos):
        """Write this token's K/V at `pos` and attend to the window of cached keys. qk: (B, H + H_kv, D)."""
        B, H, H_kv, D = qk.size(0), self.n_head, self.n_kv_head, self.head_dim
        k_cache, v_cache = kv_cache.get_layer_cache(i)                      # (B, T_max, H_kv, D)
        k_cache[:, pos] = qk[:, H:]
        v_cache[:, pos] = v
        start = max(0, pos - self.window_sizes[i])
        keys = k_cache[:, start:pos + 1].transpose(1, 2)                  # (B, H_kv, Tk, D)
        values = v_cache[:, start:pos + 1].transpose(1, 2)
        # the H // H_kv query heads sharing a kv head act as that head's query positions: no mask, no repeat
        return F.scaled_dot_product_attention(qk[:, :H].view(B, H_kv, H // H_kv, D), keys, values,
                                              scale=layer["softmax_scale"])

    def _attend_ragged(self, i, layer, qk, v, kv_cache, max_pos):
        """_attend for rows at different positions: row b writes at its own position and a mask keeps each row to
        its own window of its own prefix (keys run from the earliest window start to the longest row)."""
        B, H, H_kv, D = qk.size(0), self.n_head, self.n_kv_head, self.head_dim
        positions = kv_cache.row_positions()
        k_cache, v_cache = kv_cache.get_layer_cache(i)
        rows = torch.arange(B)
        k_cache[rows, positions] = qk[:, H:]
        v_cache[rows, positions] = v
        window = self.window_sizes[i]
        start = max(0, min(kv_cache.host_row_positions()) - window)
        keys = k_cache[:, start:max_pos + 1].transpose(1, 2)             # (B, H_kv, Tk, D)
        values = v_cache[:, start:max_pos + 1].transpose(1, 2)
        distance = positions[:, None] - torch.arange(start, max_pos + 1)  # (B, Tk)
        mask = ((distance >= 0) & (distance <= window))[:, None, None, :]
        return F.scaled_dot_product_attention(qk[:, :H].view(B, H_kv, H // H_kv, D), keys, values, attn_mask=mask,
                                              scale=layer["softmax_scale"])
