"""
The depth dial: from --depth to the model's shape, and (through scaling laws) to the training horizon, the
batch size, the learning-rate multiplier and the Muon weight decay. Pure functions, tested against the
reference's numbers (reference §2.5-2.6).
"""

import math

import torch

from nanochat.cli import UserError
from nanochat.gpt import GPT, GPTConfig

B_REF = 2 ** 19          # optimal total batch size (tokens) measured at d12, the reference depth
DEFAULT_ROPE_BASE = GPTConfig.rope_base


def model_config_for_depth(depth, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern,
                           rope_base=DEFAULT_ROPE_BASE):
    # model_dim rounded up to a multiple of head_dim, so every head is exactly head_dim wide
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern, rope_base=rope_base)


def build_meta_model(config):
    """The model on the meta device: shapes and counts only, no memory."""
    with torch.device("meta"):
        return GPT(config)


def plan_training(num_iterations, target_flops, target_param_data_ratio, total_batch_size, weight_decay,
                  scaling_params, d12_scaling_params, flops_per_token):
    """Horizon, batch size, LR multiplier and Muon weight decay from the scaling-law rules.
    - tokens target = ratio * scaling params; the d12 reference horizon D_REF uses the same ratio
    - batch (when -1): B_REF * (D / D_REF)^0.383 rounded to a power of 2 (Power Lines, arXiv 2505.13738)
    - all LRs x sqrt(B / B_REF); Muon WD x sqrt(B / B_REF) * D_REF / D (T_epoch, arXiv 2405.13698)
    - iterations: --num-iterations (>= 0) > --target-flops > --target-param-data-ratio (first enabled wins)"""
    if num_iterations < 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        raise UserError("No training horizon: pass one of --num-iterations, --target-flops or --target-param-data-ratio")
    # The ratio cancels in the batch and WD formulas, so a disabled ratio (-1) still gives the reference numbers.
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else 12
    target_tokens = int(ratio * scaling_params)
    d_ref = ratio * d12_scaling_params
    if total_batch_size == -1:
        predicted = B_REF * (target_tokens / d_ref) ** 0.383
        total_batch_size = 2 ** round(math.log2(predicted))
        batch_auto = True
    else:
        batch_auto = False
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    weight_decay_scaled = weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens)
    if num_iterations >= 0:
        horizon_source = "--num-iterations"
    elif target_flops > 0:
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
        horizon_source = "--target-flops"
    else:
        num_iterations = target_tokens // total_batch_size
        horizon_source = "--target-param-data-ratio"
    return dict(num_iterations=num_iterations, horizon_source=horizon_source, total_batch_size=total_batch_size,
                batch_auto=batch_auto, target_tokens=target_tokens, batch_lr_scale=batch_lr_scale,
                weight_decay_scaled=weight_decay_scaled)


def ntk_rope_base(source_base, source_len, target_len, head_dim):
    """NTK-aware RoPE scaling for context extension: base * s^(d/(d-2)) with s = target_len / source_len, which
    keeps the lowest frequency's wavelength in step with the longer context while barely moving the high ones."""
    s = target_len / source_len
    return source_base * s ** (head_dim / (head_dim - 2))
