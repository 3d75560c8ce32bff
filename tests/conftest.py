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
