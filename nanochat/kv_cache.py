"""
The KV cache the GPT model reads and writes during inference (re-exported by nanochat.engine).

Layout follows flash-attention's kvcache API: one preallocated (B, T, H, D) block per layer, stacked as
k_cache/v_cache of shape (L, B, T, H, D), and a per-row position `cache_seqlens` (int32). All rows share one
position (RaggedKVCache below lets each row have its own, for continuous batching). Besides K/V the cache carries the smear state: `prev_embedding` is the
normalized embedding of the last token fed in, so that single-token decode mixes in its predecessor exactly
like the full-sequence forward does.
"""

import torch

from nanochat.common import COMPUTE_DTYPE


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

    def row_positions(self):
        """Per-row positions as a (B,) tensor when rows sit at different positions, None when they share one
        (this cache: always None; see RaggedKVCache)."""
        return None


class RaggedKVCache:
    """A KV cache for continuous batching: `max_rows` rows, each holding its own sequence at its own length.

    The rows [0, active) are the ones a forward decodes (the model sees a batch of `active` rows, each at its own
    position: rotary, the K/V write and the attention mask follow the row's length); rows past `active` are free or
    parked (a row waiting for its tool keeps its K/V there). A scheduler moves sequences between rows with
    swap_rows, so the active rows are always one contiguous block and a forward needs no gather.
    A new sequence is prefilled into an ordinary batch-1 KVCache (in chunks) and copied in with insert().
    Same interface as KVCache for GPT.forward and CPUDecoder.step (get_pos is the longest active row)."""

    def __init__(self, max_rows, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.max_rows = max_rows
        self.max_seq_len = seq_len
        self.n_layers, self.n_heads, self.head_dim = num_layers, num_heads, head_dim
        self.k_cache = torch.zeros(num_layers, max_rows, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros(num_layers, max_rows, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.host_lengths = [0] * max_rows  # the same on the host: reading the tensor would sync with a GPU
        self._prev = None                   # (max_rows, 1, C) smear state, allocated at the first insert
        self.active = 0

    @classmethod
    def for_model(cls, model, max_rows, seq_len=None, device=None):
        config = model.config
        return cls(max_rows=max_rows, num_heads=config.n_kv_head, seq_len=seq_len or config.sequence_len,
                   head_dim=config.n_embd // config.n_head, num_layers=config.n_layer,
                   device=model.get_device() if device is None else device, dtype=COMPUTE_DTYPE)

    # --- what the model reads and writes (the active rows only)

    @property
    def cache_seqlens(self):
        return self.lengths[:self.active]

    @property
    def prev_embedding(self):
        # a copy: the forward reads the previous state and then overwrites it through the setter
        return None if self._prev is None else self._prev[:self.active].clone()

    @prev_embedding.setter
    def prev_embedding(self, value):
        self._prev[:self.active].copy_(value)

    def get_pos(self):
        """The longest active row's length (the bound for a forward's writes)."""
        return max(self.host_lengths[:self.active], default=0)

    def host_row_positions(self):
        return self.host_lengths[:self.active]

    def row_positions(self):
        return self.lengths[:self.active].long()

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx, :self.active], self.v_cache[layer_idx, :self.active]

    def advance(self, num_tokens):
        self.lengths[:self.active] += num_tokens
        for row in range(self.active):
            self.host_lengths[row] += num_tokens

    # --- what the scheduler does

    def insert(self, row, other):
        """Copy a batch-1 KVCache (a prefilled prompt) into `row`."""
        assert other.batch_size == 1 and other.prev_embedding is not None, "insert a prefilled batch-1 KVCache"
        n = other.get_pos()
        self.k_cache[:, row, :n] = other.k_cache[:, 0, :n]
        self.v_cache[:, row, :n] = other.v_cache[:, 0, :n]
        if self._prev is None:
            self._prev = torch.zeros(self.max_rows, 1, other.prev_embedding.size(-1),
                                     device=self.k_cache.device, dtype=other.prev_embedding.dtype)
        self._prev[row] = other.prev_embedding[0]
        self.lengths[row] = n
        self.host_lengths[row] = n

    def swap_rows(self, a, b):
        """Exchange the sequences in rows a and b (only the cached prefix of the longer one is copied)."""
        if a == b:
            return
        n = max(self.host_lengths[a], self.host_lengths[b])
        for cache in (self.k_cache, self.v_cache):
            cache[:, [a, b], :n] = cache[:, [b, a], :n]  # the right side is a copy, so this really swaps
        if self._prev is not None:
            self._prev[[a, b]] = self._prev[[b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]
        self.host_lengths[a], self.host_lengths[b] = self.host_lengths[b], self.host_lengths[a]

    def clear_row(self, row):
        self.lengths[row] = 0
        self.host_lengths[row] = 0
