"""Attention kernels (SDPA path) against a naive masked softmax: causal, sliding window, GQA, KV-cache decode."""
import math

import pytest
import torch

from nanochat import attention as attn_mod
from nanochat.attention import attention, attention_with_kvcache


def naive_attention(q, k, v, window, offset=0, scale=None):
    """Query i sits at absolute position offset + i and sees keys j with pos - window <= j <= pos."""
    B, Tq, H, D = q.shape
    Tk, H_kv = k.size(1), k.size(2)
    rep = H // H_kv
    k = k.repeat_interleave(rep, dim=2).double()
    v = v.repeat_interleave(rep, dim=2).double()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
    qpos = offset + torch.arange(Tq).view(-1, 1)
    kpos = torch.arange(Tk).view(1, -1)
    visible = (kpos <= qpos) & (kpos >= qpos - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).float()


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture(autouse=True)
def force_sdpa(monkeypatch):
    monkeypatch.setattr(attn_mod, "_override_impl", "sdpa")


@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [100, 11, 5, 3, 0])
def test_training_attention_matches_naive(H, H_kv, window):
    B, T, D = 2, 12, 16
    q, k, v = rand(B, T, H, D, seed=1), rand(B, T, H_kv, D, seed=2), rand(B, T, H_kv, D, seed=3)
    y = attention(q, k, v, window, scale=0.3)
    torch.testing.assert_close(y, naive_attention(q, k, v, window, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 100, 300, 600, 698])
def test_long_windowed_attention_in_query_chunks_matches_naive(window):
    """T spans several query chunks (chunk = max(window, 256)): chunk boundaries must not change any output."""
    B, T, H, H_kv, D = 1, 700, 2, 1, 8
    q, k, v = rand(B, T, H, D, seed=4), rand(B, T, H_kv, D, seed=5), rand(B, T, H_kv, D, seed=6)
    y = attention(q, k, v, window, scale=0.3)
    torch.testing.assert_close(y, naive_attention(q, k, v, window, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window", [64, 6, 2])
def test_kvcache_prefill_chunks_and_decode_match_naive(H, H_kv, window):
    """Prefill 5 tokens, a chunk of 4 at offset 5, then 3 single-token steps; each output equals the naive
    attention of those queries over the whole sequence so far, and the cache holds every k/v in order."""
    B, T, D, T_max = 2, 12, 8, 16
    q, k, v = rand(B, T, H, D, seed=4), rand(B, T, H_kv, D, seed=5), rand(B, T, H_kv, D, seed=6)
    k_cache = torch.zeros(B, T_max, H_kv, D)
    v_cache = torch.zeros(B, T_max, H_kv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    pos = 0
    for n in [5, 4, 1, 1, 1]:
        sl = slice(pos, pos + n)
        y = attention_with_kvcache(q[:, sl], k_cache, v_cache, k[:, sl], v[:, sl], seqlens, pos, window)
        expected = naive_attention(q[:, sl], k[:, :pos + n], v[:, :pos + n], window, offset=pos)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        pos += n
        seqlens += n
    torch.testing.assert_close(k_cache[:, :T], k)
    torch.testing.assert_close(v_cache[:, :T], v)
    assert k_cache[:, T:].abs().sum() == 0  # nothing written past the end


def test_decode_output_layout_matches_heads():
    """Single-token decode folds GQA query heads; the output must come back in query-head order."""
    B, H, H_kv, D = 1, 6, 2, 4
    k_cache = torch.zeros(B, 8, H_kv, D)
    v_cache = torch.zeros(B, 8, H_kv, D)
    k, v = rand(B, 3, H_kv, D, seed=7), rand(B, 3, H_kv, D, seed=8)
    k_cache[:, :2], v_cache[:, :2] = k[:, :2], v[:, :2]
    q = rand(B, 1, H, D, seed=9)
    y = attention_with_kvcache(q, k_cache, v_cache, k[:, 2:], v[:, 2:], torch.full((B,), 2, dtype=torch.int32), 2, 100)
    torch.testing.assert_close(y, naive_attention(q, k, v, 100, offset=2), atol=1e-5, rtol=1e-5)
