"""
Causal (optionally sliding-window) attention, for training and for KV-cache inference.

Tensors use flash-attention's (B, T, H, D) layout; GQA is allowed (H query heads, H_kv key/value heads,
query head h reads kv head h // (H // H_kv)). A window w means a query at position i sees keys j with
i - w <= j <= i (flash-attention's window_size=(w, 0)); w >= the number of keys is plain causal attention.

Kernel: Flash-Attention-3 when the `flash_attn_interface` package is importable (Hopper GPU, bf16, no
download), otherwise PyTorch SDPA:
- training / no prefix: full causal uses is_causal=True; a window that bites runs in query chunks, each with
  a small explicit mask over only the keys it can see (see _windowed_attention).
- single-token decode: attend to the valid cached prefix (the last w+1 keys when windowed); GQA is done by
  folding the query heads of each kv head into the query-length dim, so no mask and no K/V repeat.
- chunk (T > 1) into a cache at an offset: explicit mask aligned to the cache position.
- rows at different positions (continuous batching): each row writes at its own position and a (B, T, keys)
  mask gives every row its own causal window; FA3 does this natively through cache_seqlens.
"""

import torch
import torch.nn.functional as F


def _load_fa3():
    if not torch.cuda.is_available():
        return None
    try:
        if torch.cuda.get_device_capability()[0] != 9:  # FA3 kernels are built for Hopper only
            return None
        import flash_attn_interface
        return flash_attn_interface
    except Exception:
        return None


_fa3 = _load_fa3()
HAS_FA3 = _fa3 is not None
# Tests may force a kernel: "fa3", "sdpa", or None (automatic).
_override_impl = None


def _use_fa3(q):
    if _override_impl == "sdpa":
        return False
    if _override_impl == "fa3":
        assert HAS_FA3, "Flash-Attention-3 was forced but flash_attn_interface is not importable on this machine"
        return True
    return HAS_FA3 and q.is_cuda and q.dtype == torch.bfloat16


def _first(out):
    # some FA3 builds return (out, softmax_lse)
    return out[0] if isinstance(out, tuple) else out


def _causal_window_mask(num_queries, num_keys, offset, window, device):
    """(Tq, Tk) boolean mask, True = attend: query i sits at absolute position offset + i."""
    rows = offset + torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    mask = cols <= rows
    if window < num_keys:
        mask = mask & (rows - cols <= window)
    return mask


def attention(q, k, v, window, scale=None):
    """Causal attention over one sequence. q: (B, T, H, D); k, v: (B, T, H_kv, D); returns (B, T, H, D)."""
    if _use_fa3(q):
        return _first(_fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(window, 0)))
    T = q.size(1)
    gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T - 1:  # the window covers every earlier position: plain causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        y = _windowed_attention(q, k, v, window, scale, gqa)
    return y.transpose(1, 2)


def _windowed_attention(q, k, v, window, scale, gqa):
    """
    Sliding-window causal attention on (B, H, T, D) tensors, in query chunks of max(window, 256): a chunk
    [s, e) only needs keys [s - window, e). SDPA with an explicit mask computes every (query, key) pair, so
    one T x T masked call costs T^2 while the chunks cost ~T * (chunk + window) (2-3x less at T = 2560 with
    window 512 on CPU) and their masks are small. The first chunk is plain causal when the window covers it.
    """
    T = q.size(2)
    chunk = max(window, 256)
    outputs, masks = [], {}  # interior chunks share one mask shape: build it once
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        ks = max(0, s - window)
        qc, kc, vc = q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e]
        if ks == 0 and s == 0 and window >= e - 1:
            y = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            shape = (e - s, e - ks, s - ks)
            if shape not in masks:
                masks[shape] = _causal_window_mask(*shape, window, q.device)
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=masks[shape], scale=scale, enable_gqa=gqa)
        outputs.append(y)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, pos, window, scale=None, row_positions=None):
    """
    Write the new k, v (B, T, H_kv, D) into the layer's cache (B, T_max, H_kv, D) at position `pos`
    (a Python int equal to cache_seqlens, which the caller advances afterwards) and attend the new queries
    q (B, T, H, D) to everything cached so far. Returns (B, T, H, D).
    row_positions: (B,) positions when the rows sit at different positions (continuous batching; cache_seqlens
    holds the same values and `pos` is their maximum), None when every row is at `pos`.
    """
    if _use_fa3(q):  # FA3 reads each row's own length from cache_seqlens: ragged rows need nothing more
        return _first(_fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                   softmax_scale=scale, causal=True, window_size=(window, 0)))
    if row_positions is not None:
        return _ragged_attention_with_kvcache(q, k_cache, v_cache, k, v, row_positions, pos + q.size(1), window,
                                              scale)
    B, T, H, D = q.shape
    H_kv = k.size(2)
    end = pos + T
    k_cache[:, pos:end] = k
    v_cache[:, pos:end] = v
    if T == 1:
        start = max(0, end - (window + 1))
        keys = k_cache[:, start:end].transpose(1, 2)    # (B, H_kv, Tk, D)
        values = v_cache[:, start:end].transpose(1, 2)
        # the H // H_kv query heads that share a kv head become that head's "query positions"
        queries = q.view(B, H_kv, H // H_kv, D)
        y = F.scaled_dot_product_attention(queries, keys, values, scale=scale)
        return y.view(B, 1, H, D)
    if pos == 0:  # a fresh prompt: same as training
        return attention(q, k, v, window, scale=scale)
    start = max(0, pos - window)  # keys before this are outside every query's window
    keys = k_cache[:, start:end].transpose(1, 2)
    values = v_cache[:, start:end].transpose(1, 2)
    mask = _causal_window_mask(T, end - start, pos - start, window, q.device)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                       enable_gqa=H != H_kv)
    return y.transpose(1, 2)


def _ragged_attention_with_kvcache(q, k_cache, v_cache, k, v, row_positions, end, window, scale):
    """attention_with_kvcache for rows at different positions: row b's new tokens go to positions
    row_positions[b] + t, and a mask per row limits each query to its own causal window of its own prefix."""
    B, T, H, D = q.shape
    at = row_positions[:, None] + torch.arange(T, device=q.device)     # (B, T) absolute positions
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, at] = k
    v_cache[rows, at] = v
    keys = k_cache[:, :end].transpose(1, 2)                             # (B, H_kv, end, D)
    values = v_cache[:, :end].transpose(1, 2)
    distance = at[:, :, None] - torch.arange(end, device=q.device)    # (B, T, end): query pos - key pos
    mask = (distance >= 0) & (distance <= window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=H != k.size(2))
    return y.transpose(1, 2)
