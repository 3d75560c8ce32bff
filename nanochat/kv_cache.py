"""
The KV cache the GPT model reads and writes during inference (re-exported by nanochat.engine).

Layout follows flash-attention's kvcache API: one preallocated (B, T, H, D) block per layer, stacked as
k_cache/v_cache of shape (L, B, T, H, D), and a per-row position `cache_seqlens` (int32). All rows share one
position (no ragged batches). Besides K/V the cache carries the smear state: `prev_embedding` is the
normalized embedding of the last token fed in, so that single-token decode mixes in its predecessor exactly
like the full-sequence forward does.
"""

import torch


class KVCache:

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.k_cache = torch.zeros(num_layers, batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros(num_layers, batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # the same position as a Python int: reading the tensor every step would sync with a GPU
        self.pos = 0
        self.prev_embedding = None  # (B, 1, C) normalized embedding of the last token seen, set by GPT.forward

    @classmethod
    def for_model(cls, model, batch_size, seq_len, device=None):
        """A cache shaped for this GPT's config (its kv heads, head dim, layers), in the compute dtype."""
        from nanochat.common import COMPUTE_DTYPE
        config = model.config
        return cls(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                   head_dim=config.n_embd // config.n_head, num_layers=config.n_layer,
                   device=model.get_device() if device is None else device, dtype=COMPUTE_DTYPE)

    def reset(self):
        """Forget everything (the K/V memory is not cleared: new writes overwrite it in order)."""
        self.cache_seqlens.zero_()
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        """Number of tokens already in the cache (all rows share it)."""
        return self.pos

    def get_layer_cache(self, layer_idx):
        """(k_cache, v_cache) views of shape (B, T_max, H, D) for one layer."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        """Move the position on after every layer has written its K/V for num_tokens new tokens."""
        self.cache_seqlens += num_tokens
        self.pos += num_tokens

    def prefill(self, other):
        """Start this (empty) cache from another one, e.g. a batch-1 prompt prefill fanned out to B rows."""
        assert self.get_pos() == 0, "Cannot prefill a non-empty KV cache: call reset() first"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim), \
            "KV caches have different shapes (layers, kv heads, head dim)"
        assert other.batch_size in (1, self.batch_size), \
            f"Cannot prefill {self.batch_size} rows from a cache with {other.batch_size} rows"
        pos = other.get_pos()
        assert pos <= self.max_seq_len, f"Source cache holds {pos} tokens but this cache only has room for {self.max_seq_len}"
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        self.pos = pos
        if other.prev_embedding is not None:
            # materialize one row per sample: rows diverge as soon as they sample different tokens
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()
        else:
            self.prev_embedding = None
