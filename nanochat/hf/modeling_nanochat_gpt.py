"""
nanochat's GPT for `transformers` (shipped in exported folders: AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)). Self-contained on purpose: it imports torch and transformers, nothing of nanochat.

The math is nanochat/gpt.py's, restated op for op so the logits agree to float rounding (tests/test_export_hf.py
compares them): embedding -> RMSNorm -> smear; per layer x = resid_lambda*x + x0_lambda*x0, then attention
(half-split rotary turning by -theta, QK-norm, x qk_scale on q and k, GQA, sliding window, value embeddings mixed
into V through a per-kv-head gate) and a relu^2 MLP; backout of the mid-network residual; final norm; untied
lm_head over the padded vocab, cropped, softcapped in fp32. Parameter names are nanochat's, so an exported
state dict loads here unchanged and back into nanochat unchanged.

No KV cache: every forward (and every generate step) runs the whole sequence. That keeps the code independent of
transformers' cache API; for fast inference load the folder with nanochat (its Engine) instead.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat_gpt import NanochatGPTConfig


def rms_norm(x):
    # parameter-free, eps = the dtype's machine epsilon (nanochat's norm)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def rotary_tables(position_ids, head_dim, base, dtype):
    """cos, sin of shape (B, T, 1, D): full width, cos = [cos, cos], sin = [sin, -sin] (see apply_rotary)."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (base ** (channels / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rotary(x, cos, sin):
    # channel i pairs with i + D/2: (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def attention_mask_4d(seq_len, window, real, device):
    """Boolean (1 or B, 1, T, T), True = attend: query i sees keys j with i - window <= j <= i, and no padding
    (real: (B, T) bool or None). A pad sees itself, so its softmax row is never empty (its output is unused)."""
    rows = torch.arange(seq_len, device=device)[:, None]
    cols = torch.arange(seq_len, device=device)[None, :]
    mask = ((cols <= rows) & (rows - cols <= window))[None, None]
    if real is not None:
        mask = (mask & real[:, None, None, :]) | (rows == cols)
    return mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.scale = config.qk_scale * config.qk_scale / math.sqrt(self.head_dim)
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, mask):
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q = rms_norm(apply_rotary(self.c_q(x).view(B, T, H, D), cos, sin))
        k = rms_norm(apply_rotary(self.c_k(x).view(B, T, H_kv, D), cos, sin))
        v = self.c_v(x).view(B, T, H_kv, D)
        if ve is not None:
            # value residual: v += 3 * sigmoid(gate) * ve, one gate per kv head
            gate = torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = torch.addcmul(v, gate.unsqueeze(-1), ve.view(B, T, H_kv, D), value=3.0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if H != H_kv:  # query head h reads kv head h // (H // H_kv)
            k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(rms_norm(x), ve, cos, sin, mask)
        return x + self.mlp(rms_norm(x))


class NanochatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatGPTConfig
    base_model_prefix = "model"  # no separate base model: every parameter sits at nanochat's own path
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        C, V = config.n_embd, config.padded_vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.post_init()

    def _init_weights(self, module):
        # only for models built from a config (from_pretrained loads every tensor): neutral scalars, small matrices
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, NanochatGPTForCausalLM):
            init.ones_(module.resid_lambdas)
            init.zeros_(module.x0_lambdas)
            init.zeros_(module.smear_lambda)
            init.zeros_(module.backout_lambda)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # generate() must hand us the whole sequence every step

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, **kwargs):
        """Logits (B, T, vocab_size) in fp32; loss when labels are given (HF convention: labels are the input ids,
        shifted here, -100 ignored). With padding (attention_mask 0, left or right) every real token gets the logits
        it gets alone: pads are never attended to or smeared in, and positions count real tokens only."""
        _check_inputs(input_ids, use_cache, kwargs)
        B, T = input_ids.shape
        real = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device)[None, :] if real is None
                            else (real.long().cumsum(-1) - 1).clamp(min=0))
        x = rms_norm(self.transformer.wte(input_ids))
        x = self._smear(x, real)
        cos, sin = rotary_tables(position_ids, self.config.n_embd // self.config.n_head, self.config.rope_base,
                                 x.dtype)
        masks = {w: attention_mask_4d(T, w, real, x.device) for w in set(self.config.window_sizes)}
        x0, x_backout = x, None
        for i, block in enumerate(self.transformer.h):
            x = torch.addcmul(self.resid_lambdas[i] * x, self.x0_lambdas[i], x0)
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.config.window_sizes[i]])
            if i == self.config.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        if logits_to_keep:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(rms_norm(x))[..., :self.config.vocab_size].float()
        softcap = self.config.logit_softcap
        logits = softcap * torch.tanh(logits / softcap)
        loss = None if labels is None else _shifted_loss(logits, labels, kwargs.get("num_items_in_batch"))
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _smear(self, x, real):
        # x[t] += smear_lambda * sigmoid(smear_gate(x[t][:channels])) * x[t-1]; the first token has no predecessor,
        # nor has a token right after padding
        channels = self.smear_gate.in_features
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :channels]))
        if real is not None:
            gate = gate * real[:, :-1, None]
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)


def _check_inputs(input_ids, use_cache, kwargs):
    if input_ids is None:
        raise ValueError("NanochatGPTForCausalLM needs input_ids (inputs_embeds is not supported: value embeddings "
                         "are looked up from the token ids)")
    if use_cache or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise ValueError("NanochatGPTForCausalLM has no KV cache: call it (and generate) with use_cache=False, "
                         "the default in its config")


def _shifted_loss(logits, labels, num_items_in_batch):
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch
