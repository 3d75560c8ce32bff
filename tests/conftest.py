"""Tests are hermetic: every test gets its own NANOCHAT_BASE_DIR and a fixed fp32 compute dtype."""
import os

# Must happen before nanochat.common is imported anywhere: COMPUTE_DTYPE is read once at import.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
# Tiny test models gain nothing from intra-op threads and lose a lot when cores are oversubscribed
# (two gloo ranks, a sandbox child, the tokenizer pool): one thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, whatever the previous test set: with 2 OpenMP threads on a busy
    machine every parallel region waits for a descheduled thread (a d2 train step 25 ms vs ~1.8 s)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch):
    base = tmp_path / "nanochat_base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    # Hub endpoints point nowhere reachable unless a test starts its own local server.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    yield base


# -----------------------------------------------------------------------------
# Tiny models for inference tests (serving, batching)

SPECIAL_NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, the 9 special tokens follow (256..264); no chat rendering."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_NAMES)}

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def get_vocab_size(self):
        return 256 + len(SPECIAL_NAMES)

    def get_special_tokens(self):
        return set(SPECIAL_NAMES)

    def encode(self, text, prepend=None, append=None):
        ids = list(text.encode("utf-8"))
        if prepend is not None:
            ids = [prepend if isinstance(prepend, int) else self.special[prepend]] + ids
        if append is not None:
            ids = ids + [append if isinstance(append, int) else self.special[append]]
        return ids

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def build_tiny_gpt(seed=0, sequence_len=64, vocab_size=256 + len(SPECIAL_NAMES), short_window=8):
    """A 3-layer GPT with GQA, a short window, value embeddings, and every parameter random and non-zero
    (so attention, smear, value embeddings and backout all matter)."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL", short_window=short_window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 1.0 if "wte" in name or "value_embeds" in name else p.size(1) ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(0.5 + 0.3 * torch.rand(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def tiny_gpt_factory():
    """build_tiny_gpt(seed=0, sequence_len=64, vocab_size=265, short_window=8) -> a random tiny GPT."""
    return build_tiny_gpt


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()
