"""Tests are hermetic: every test gets its own NANOCHAT_BASE_DIR and a fixed fp32 compute dtype."""
import atexit
import os
import shutil
import tempfile

# Must happen before nanochat.common is imported anywhere: COMPUTE_DTYPE is read once at import.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
# Tiny test models gain nothing from intra-op threads and lose a lot when cores are oversubscribed
# (two gloo ranks, a sandbox child, the tokenizer pool): one thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# huggingface_hub / transformers caches (hub downloads, trust_remote_code modules) go to a temp dir, read at import
_hf_home = tempfile.mkdtemp(prefix="nanochat-tests-hf-")
os.environ["HF_HOME"] = _hf_home
atexit.register(shutil.rmtree, _hf_home, True)

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
# Tiny models and checkpoints. nanochat is imported here, below the environment set-up at the top (the compute
# dtype is fixed when nanochat.common is first imported).

import dataclasses  # noqa: E402

from nanochat.checkpoint_manager import save_checkpoint  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer, save_token_bytes  # noqa: E402


@pytest.fixture(scope="session")
def build_gpt():
    """build(config, seed=0) -> a GPT on the CPU, its init_weights() drawn after torch.manual_seed(seed)."""
    def build(config, seed=0):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        return model
    return build


@pytest.fixture(scope="session")
def build_tiny_gpt(build_gpt):
    """build(sequence_len, vocab_size, seed=0) -> a random 2-layer, 32-wide GPT (full-context attention)."""
    def build(sequence_len, vocab_size, seed=0):
        return build_gpt(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2,
                                   n_kv_head=2, n_embd=32, window_pattern="L"), seed)
    return build


@pytest.fixture(scope="session")
def build_tiny_checkpoint(build_tiny_gpt):
    """build(base_dir, texts, vocab_size, sequence_len, checkpoint_dir, step, meta=None) -> tokenizer: a tokenizer
    trained on `texts` saved in base_dir/tokenizer (with token_bytes, as tok_train leaves it) and a random tiny GPT
    saved as the checkpoint base_dir/checkpoint_dir/<step> (meta: model_config and step, plus `meta`)."""
    def build(base_dir, texts, vocab_size, sequence_len, checkpoint_dir, step, meta=None):
        tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), vocab_size=vocab_size)
        tokenizer_dir = os.path.join(base_dir, "tokenizer")
        tokenizer.save(tokenizer_dir)
        save_token_bytes(tokenizer, tokenizer_dir)
        model = build_tiny_gpt(sequence_len, tokenizer.get_vocab_size())
        meta = {"step": step, "model_config": dataclasses.asdict(model.config), **(meta or {})}
        save_checkpoint(os.path.join(base_dir, checkpoint_dir), step, model.state_dict(), None, meta)
        return tokenizer
    return build
