"""
The GPT model (nanochat's architecture, parameter names and checkpoint format).

- token embedding -> parameter-free RMSNorm -> smear (mix in the previous token's embedding, a cheap bigram)
- per layer: x = resid_lambda*x + x0_lambda*x0, then a pre-norm block (attention, relu^2 MLP), no biases
- attention: rotary (theta 100k, half-split), QK-norm then x1.2 on both, GQA, sliding windows ("SSSL"),
  value embeddings (ResFormer) mixed into V through a per-head gate on alternating layers
- backout: subtract a learned multiple of the mid-network residual before the final norm
- untied lm_head over a vocab padded to a multiple of 64 (cropped back), logits softcapped at 15 in fp32

Precision is explicit (no autocast): master weights are fp32, Linear casts its weight to the activation
dtype, activations and embedding tables live in nanochat.common.COMPUTE_DTYPE.

Build on the meta device, `to_empty(device)`, then `init_weights()`: __init__ only describes shapes,
init_weights writes every parameter and buffer.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, embedding_table_dtype, print0
from nanochat.attention import attention, attention_with_kvcache
from nanochat.chunked_loss import softcapped_cross_entropy, use_chunked_loss
from nanochat.optim import MuonAdamW

VE_GATE_CHANNELS = 12     # value-embedding gate reads the first 12 channels of the attention input
SMEAR_GATE_CHANNELS = 24  # smear gate reads the first 24 channels of the embedding
SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6     # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    # S/L string tiled over the layers (the last layer is always L). L = sequence_len, S = short_window.
    window_pattern: str = "SSSL"
    # 0 = nanochat's short window: a quarter of sequence_len rounded up to a multiple of 128 (2048 -> 512).
    # Set explicitly to get a short window below 128 (tiny test models).
    short_window: int = 0
    rope_base: float = 100000.0
    # q and k are each multiplied by this after QK-norm ("sharper attention"); 1.0 is nanochat's 2025
    # architecture (and transformers' native nanochat type)
    qk_scale: float = 1.2


def norm(x):
    # parameter-free RMSNorm (eps = the dtype's machine epsilon, like nanochat)
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def compute_window_sizes(config):
    """Per-layer attention window (keys at distance <= window are visible)."""
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"window_pattern {config.window_pattern!r} must be a non-empty string of S and L, e.g. SSSL")
    long_window = config.sequence_len
    short_window = config.short_window or -(-long_window // 4 // 128) * 128
    windows = [short_window if pattern[i % len(pattern)] == "S" else long_window for i in range(config.n_layer)]
    windows[-1] = long_window
    return windows


def _embedding(num_embeddings, embedding_dim):
    # Passing the (uninitialised) weight skips nn.Embedding's random init: init_weights writes it anyway, and a
    # normal_() on the meta device pulls in torch._dynamo (seconds of import time for every process).
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))


def apply_rotary_emb(x, cos, sin):
    """
    Half-split rotary: channel i pairs with channel i + D/2, (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin).
    That rotates by -theta like nanochat (only the relative q/k rotation matters; kept so nanochat checkpoints
    load unchanged). The tables are full width, cos = [cos, cos] and sin = [sin, -sin], so the whole thing is
    x * cos + swap_halves(x) * sin: three ops instead of nine (decode is op-bound on CPU).
    """
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


class Linear(nn.Linear):
    """nn.Linear without autocast: fp32 master weight, matmul in the activation's dtype."""

    def forward(self, x):
        w = self.weight
        if w.dtype != x.dtype:  # checked in Python: a no-op .to() still costs a dispatcher call per matmul
            w = w.to(dtype=x.dtype)
        return F.linear(x, w)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # qk_scale on both q and k is folded into the softmax scale (one multiply instead of two tensors)
        self.softmax_scale = config.qk_scale ** 2 / math.sqrt(self.head_dim)
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window, kv_cache, pos):
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q = norm(apply_rotary_emb(self.c_q(x).view(B, T, H, D), cos, sin))
        k = norm(apply_rotary_emb(self.c_k(x).view(B, T, H_kv, D), cos, sin))
        v = self.c_v(x).view(B, T, H_kv, D)
        if ve is not None:
            # value residual: v += 3 * sigmoid(gate) * ve, one gate per kv head, range (0, 3)
            gate = torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = torch.addcmul(v, gate.unsqueeze(-1), ve.view(B, T, H_kv, D), value=3.0)
        if kv_cache is None:
            y = attention(q, k, v, window, scale=self.softmax_scale)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = attention_with_kvcache(q, k_cache, v_cache, k, v, kv_cache.cache_seqlens, pos, window,
                                       scale=self.softmax_scale, row_positions=kv_cache.row_positions())
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache, pos):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache, pos)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        """Runs on the meta device: shapes only. Real values are written by init_weights()."""
        super().__init__()
        self.config = config
        self.window_sizes = compute_window_sizes(config)
        padded_vocab = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
        if padded_vocab != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {padded_vocab} for efficiency")
        self.padded_vocab_size = padded_vocab
        self.transformer = nn.ModuleDict({
            "wte": _embedding(padded_vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, padded_vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))  # scales the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))     # mixes the embedding x0 back in per layer
        self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.empty(1))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({str(i): _embedding(padded_vocab, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.backout_layer = config.n_layer // 2  # the residual after this block is subtracted at the end
        # Rotary tables cover 10x the training context (inference may run past it); not saved in checkpoints.
        self.rotary_seq_len = config.sequence_len * 10
        # Placeholders (computing them here would run arange on meta, which imports torch._dynamo): init_weights
        # fills them on the real device.
        rotary_shape = (1, self.rotary_seq_len, 1, head_dim)
        self.register_buffer("cos", torch.empty(rotary_shape, dtype=COMPUTE_DTYPE), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape, dtype=COMPUTE_DTYPE), persistent=False)

    def _precompute_rotary(self, device):
        head_dim = self.config.n_embd // self.config.n_head
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_base ** (channels / head_dim))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        # full-width tables for apply_rotary_emb, (1, T, 1, D): broadcast over batch and heads
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)
        return cos.to(COMPUTE_DTYPE)[None, :, None, :], sin.to(COMPUTE_DTYPE)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Write every parameter and buffer (the model may come from meta + to_empty holding garbage)."""
        C = self.config.n_embd
        n = self.config.n_layer
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3 ** 0.5 * C ** -0.5  # Uniform(-s, s) has std 1/sqrt(C) without a normal's outliers
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        # stronger residual / more x0 in early layers: 1.15 -> 1.05 and 0.20 -> 0.05
        layer_frac = torch.arange(n, dtype=torch.float32, device=self.resid_lambdas.device) / max(n - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * layer_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * layer_frac)
        # nanochat 5019accc never initialised these three (garbage after to_empty); upstream's fix:
        torch.nn.init.zeros_(self.smear_lambda)
        torch.nn.init.constant_(self.backout_lambda, 0.2)
        torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.cos, self.sin = self._precompute_rotary(self.cos.device)
        table_dtype = embedding_table_dtype(self.transformer.wte.weight.device)
        self.transformer.wte.to(dtype=table_dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=table_dtype)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Counting

    def num_params_by_group(self):
        """Parameter counts per optimizer-ish group: wte, value_embeds, lm_head, transformer_matrices, scalars, total."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                               self.smear_lambda, self.backout_lambda)),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is missing from the groups"
        return counts

    def num_scaling_params(self):
        """Parameters used for the compute-optimal horizon: transformer matrices + lm_head (Kaplan-style)."""
        counts = self.num_params_by_group()
        return counts["transformer_matrices"] + counts["lm_head"]

    def estimate_flops(self):
        """
        Training FLOPs per token (forward + backward): 6 per matmul weight (2 forward, 4 backward) over every
        parameter except the embedding lookups and scalars, plus attention scores/values 12 * H * D per visible
        key, where a layer sees min(window, sequence_len) keys (PaLM appendix, with sliding windows).
        """
        counts = self.num_params_by_group()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        H, T = self.config.n_head, self.config.sequence_len
        D = self.config.n_embd // H
        attn_flops = sum(12 * H * D * min(window, T) for window in self.window_sizes)
        return 6 * matmul_params + attn_flops

    # -------------------------------------------------------------------------
    # Optimizer

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """nanochat's parameter groups: AdamW for embeddings, lm_head and scalars, Muon (grouped by shape) for
        every matrix inside the blocks (VE gates included). AdamW LRs for tables scale as 1/sqrt(d_model/768).
        Every LR derives from an argument, so a caller's scaling (base_train's sqrt(batch / 2^19)) reaches every group;
        nanochat's fixed 0.2 for smear/backout (= 0.4 * the default scalar_lr) escaped it, and at small batch
        backout_lambda overtook the last resid_lambda, flipping the sign of what lm_head sees (dev/LEARNING.md)."""
        dmodel_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({self.config.n_embd}/768) = {dmodel_scale:.6f}")
        matrix_params = list(self.transformer.h.parameters())
        smear_params = [self.smear_gate.weight, self.smear_lambda, self.backout_lambda]
        adamw = dict(kind="adamw", eps=1e-10)
        param_groups = [
            dict(adamw, params=list(self.lm_head.parameters()), lr=unembedding_lr * dmodel_scale,
                 betas=(0.8, 0.96), weight_decay=0.01),
            dict(adamw, params=list(self.transformer.wte.parameters()), lr=embedding_lr * dmodel_scale,
                 betas=(0.8, 0.995), weight_decay=0.001),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=0.5 * embedding_lr * dmodel_scale,
                 betas=(0.8, 0.995), weight_decay=0.01),
            dict(adamw, params=[self.resid_lambdas], lr=0.01 * scalar_lr, betas=(0.8, 0.95), weight_decay=0.05),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
            dict(adamw, params=smear_params, lr=0.4 * scalar_lr, betas=(0.8, 0.95), weight_decay=0.0),
        ]
        param_groups = [g for g in param_groups if g["params"]]  # e.g. no value embeddings in a 0-layer model
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                                     momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        covered = sum(len(g["params"]) for g in param_groups)
        assert covered == len(list(self.parameters())), "every parameter must be in exactly one optimizer group"
        optimizer = MuonAdamW(param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # -------------------------------------------------------------------------
    # Forward

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_logits_only=False, logits_from=0):
        """Loss if targets are given, else fp32 softcapped logits (B, T, vocab_size). Without targets the lm_head
        can skip positions nobody reads: last_logits_only=True returns only the last position's (B, 1, V);
        logits_from=t returns positions t.. (B, T - t, V), e.g. only a scored continuation (CORE)."""
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        if pos + T > self.cos.size(1):
            raise ValueError(f"Sequence position {pos + T} is past the rotary table ({self.cos.size(1)} = 10x "
                             f"sequence_len); shorten the prompt/generation")
        if kv_cache is not None and pos + T > kv_cache.max_seq_len:
            raise ValueError(f"KV cache is full: {pos} cached + {T} new tokens > its {kv_cache.max_seq_len} rows; "
                             f"allocate a larger KVCache")
        if kv_cache is not None and kv_cache.k_cache.dtype != COMPUTE_DTYPE:
            raise TypeError(f"KV cache holds {kv_cache.k_cache.dtype} but the model computes in {COMPUTE_DTYPE}; "
                            f"build it with KVCache.for_model(model, batch_size, seq_len)")
        row_positions = None if kv_cache is None else kv_cache.row_positions()
        if row_positions is None:
            cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        else:  # rows at different positions (continuous batching): each row reads its own slice of the tables
            at = row_positions[:, None] + torch.arange(T, device=row_positions.device)
            cos, sin = self.cos[0, at], self.sin[0, at]  # (B, T, 1, D)

        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))
        x = self._smear(x, kv_cache)

        x0 = x
        x_backout = None
        resid_lambdas, x0_lambdas = self.resid_lambdas.unbind(), self.x0_lambdas.unbind()
        for i, block in enumerate(self.transformer.h):
            x = torch.addcmul(resid_lambdas[i] * x, x0_lambdas[i], x0)
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache, pos)
            if i == self.backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        if targets is None and (last_logits_only or logits_from):
            if not 0 <= logits_from < T:
                raise ValueError(f"logits_from={logits_from} must be in [0, {T}) for a sequence of {T} tokens")
            x = x[:, -1:] if last_logits_only else x[:, logits_from:]
        x = norm(x)
        if targets is not None and use_chunked_loss(x, loss_reduction):
            # the same loss a few hundred rows at a time, never the whole (B*T, vocab) logits
            return softcapped_cross_entropy(x.flatten(0, 1), self.lm_head.weight[:self.config.vocab_size],
                                            targets.reshape(-1), SOFTCAP, loss_reduction)

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _smear(self, x, kv_cache):
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t][:24])) * x[t-1]; with a cache, x[-1] of the previous
        call is remembered so decoding one token at a time (or prefilling in chunks) matches the full forward."""
        lam = self.smear_lambda.to(x.dtype)
        prev = None
        if kv_cache is not None:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:]
        if prev is None:  # first token of the sequence has no predecessor
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x_prev = prev if x.size(1) == 1 else torch.cat([prev, x[:, :-1]], dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return torch.addcmul(x, gate, x_prev)

    # -------------------------------------------------------------------------
    # Naive generation (full recompute every step): the reference the Engine is checked against

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of ints"
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
