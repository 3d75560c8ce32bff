"""Pushing checkpoints while training (nanochat.hub, nanochat.remote): file:// and memory:// during a real base_train
run whose uploads are held back and fail once (the loop never waits for them), hf:// through huggingface_hub against a
fake hub (repo create, preupload, commit), the bounded exit wait, and pull on a fresh machine + resume ==
the uninterrupted run, bit for bit."""
import json
import os
import random
import shutil
import threading

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from nanochat import hub, remote
from nanochat.checkpoint_manager import load_model
from nanochat.tokenizer import RustBPETokenizer, save_token_bytes
from scripts import base_train, chat_sft

TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--window-pattern", "L",
        "--device-batch-size", "2", "--total-batch-size", "128", "--core-metric-every", "-1", "--sample-every", "-1",
        "--eval-every", "-1", "--warmup-steps", "2", "--compile", "0"]
WORDS = "the cat sat on a mat and then it ran far away from home to see the big red sun in the sky".split()


def make_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return RustBPETokenizer.train_from_iterator(iter(make_docs(300, 0)), 300)


@pytest.fixture
def machine(_isolated_base_dir, tiny_tokenizer, tmp_path):
    """A base dir with the tokenizer (as tok_train leaves it) and a small text corpus outside it."""
    tok_dir = os.path.join(_isolated_base_dir, "tokenizer")
    tiny_tokenizer.save(tok_dir)
    save_token_bytes(tiny_tokenizer, tok_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part_{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60, 100 + i)))
    return str(_isolated_base_dir), str(corpus)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(hub.CheckpointPusher, "backoff_seconds", 0.01)


@pytest.fixture
def clean_memory_fs():
    yield
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def local_files(base_dir):
    """{path relative to base_dir: bytes} of the checkpoints and tokenizer (what a pull must reproduce)."""
    out = {}
    for root, _, names in os.walk(base_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), base_dir).replace(os.sep, "/")
            kept = rel.split("/")[0] in ("tokenizer", "base_checkpoints", "chatsft_checkpoints")
            if kept and not name.startswith("."):
                out[rel] = open(os.path.join(root, name), "rb").read()
    return out


def remote_files(url):
    storage = remote.open_remote(url)
    out = {}
    for rel in storage.list():
        with storage.fs.open(storage.path(rel), "rb") as f:
            out[rel] = f.read()
    return out


def held_back_uploads(monkeypatch):
    """Every upload waits until the trainer closes its pusher (so training must finish without waiting for one),
    and the first upload attempt fails. Returns a record of what the pushers had done when close was called."""
    release, seen = threading.Event(), {"attempts": 0, "jobs": []}
    real_upload, real_close = remote.FsspecRemote.upload, hub.CheckpointPusher.close

    def upload(self, files, done):
        if not release.wait(10):  # the trainer is waiting for this upload: let it go on, the test will fail
            release.set()
        seen["attempts"] += 1
        seen["jobs"].append([rel for _, rel in files])
        if seen["attempts"] == 1:
            raise ConnectionError("injected failure")
        return real_upload(self, files, done)

    def close(self, timeout=600):
        with self.lock:
            seen["at_close"] = dict(pending=list(self.pending), pushed=list(self.pushed))
        release.set()
        seen["unpushed"] = real_close(self, timeout)
        return seen["unpushed"]

    monkeypatch.setattr(remote.FsspecRemote, "upload", upload)
    monkeypatch.setattr(hub.CheckpointPusher, "close", close)
    return seen


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_push_while_training_then_pull_and_resume_equals_uninterrupted(scheme, machine, tmp_path, monkeypatch,
                                                                      capsys, fast_retries, clean_memory_fs):
    base_dir, corpus = machine
    url = f"file://{tmp_path}/remote/run1" if scheme == "file" else "memory://bucket/run1"
    argv = TINY + ["--data-dir", corpus, "--num-iterations", "6", "--save-every", "3"]
    seen = held_back_uploads(monkeypatch)
    full = base_train.main(argv + ["--push-to", url, "--push-wait", "60"])
    log = capsys.readouterr().out
    # the whole loop ran, both checkpoints saved, while not one upload had finished
    assert seen["at_close"] == {"pending": ["base_checkpoints/d2 step 3", "base_checkpoints/d2 step 6"], "pushed": []}
    assert "upload of base_checkpoints/d2 step 3 failed (attempt 1/8: ConnectionError: injected failure)" in log
    assert seen["unpushed"] == [] and "all 2 checkpoint(s) pushed" in log
    first, _, second = seen["jobs"]  # the failed attempt, its retry, the second checkpoint
    assert first[-1] == "base_checkpoints/d2/meta_000003.json" and second[-1] == "base_checkpoints/d2/meta_000006.json"
    assert "tokenizer/tokenizer.pkl" in first and "tokenizer/tokenizer.pkl" in second  # each one restorable alone
    pushed = remote_files(url)
    assert pushed == local_files(base_dir)  # every file, byte for byte (optimizer shards and tokenizer too)
    assert "base_checkpoints/d2/optim_000003_rank0.pt" in pushed and "tokenizer/tokenizer.pkl" in pushed

    # a fresh machine: pull step 3, resume from the last local step, end where the uninterrupted run ended
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(fresh))
    assert hub.main(["pull", url, "--step", "3"]) == 0
    assert sorted(local_files(fresh)) == sorted(k for k in pushed if "000006" not in k)
    resumed = base_train.main(argv + ["--resume-from-step", "last"])
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(resumed["losses"][s] == full["losses"][s] for s in (3, 4, 5))
    a = torch.load(os.path.join(full["checkpoint_dir"], "model_000006.pt"))
    b = torch.load(os.path.join(resumed["checkpoint_dir"], "model_000006.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exit_wait_is_bounded_and_names_what_is_unpushed(machine, monkeypatch, capsys, clean_memory_fs):
    base_dir, corpus = machine
    stuck, pushers = threading.Event(), []
    monkeypatch.setattr(remote.FsspecRemote, "upload", lambda self, files, done: stuck.wait(30))
    real_close = hub.CheckpointPusher.close
    monkeypatch.setattr(hub.CheckpointPusher, "close",
                        lambda self, timeout: pushers.append(self) or real_close(self, timeout))
    try:
        base_train.main(TINY + ["--data-dir", corpus, "--num-iterations", "2", "--push-to", "memory://stuck",
                                "--push-wait", "0.5"])
        log = capsys.readouterr().out
        assert "WARNING: still unpushed at exit: base_checkpoints/d2 step 2" in log
        assert "python -m nanochat.hub push memory://stuck" in log
    finally:
        stuck.set()
        for pusher in pushers:
            pusher.thread.join(10)


def test_hf_push_during_sft_through_the_hub_api_and_pull(fake_hub, _isolated_base_dir, build_tiny_checkpoint, tiny_chat_tokenizer,
                                                         tmp_path, monkeypatch, capsys, fast_retries):
    build_tiny_checkpoint(str(_isolated_base_dir), tiny_chat_tokenizer, 64, os.path.join("base_checkpoints", "d2"), 0, meta={
        "max_seq_len": 64, "device_batch_size": 4, "total_batch_size": 256, "user_config": {}})
    rows = [[{"role": "user", "content": f"what is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
            for i in range(30)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fake_hub.fail_commits = 1
    chat_sft.main(["--device-type", "cpu", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size",
                   "64", "--eval-tokens", "64", "--chatcore-every", "-1", "--custom-only", "--extra-train-jsonl",
                   str(data), "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1",
                   "--push-to", "hf://org/name/run1"])
    log = capsys.readouterr().out
    assert "HfHubHTTPError" in log and "retrying" in log and "all 2 checkpoint(s) pushed" in log
    calls = [(method, path) for method, path, _ in fake_hub.requests]
    assert ("POST", "/api/repos/create") in calls
    assert ("POST", "/api/models/org/name/preupload/main") in calls
    assert calls.count(("POST", "/api/models/org/name/commit/main")) == 3  # one failed, then one per checkpoint
    assert {auth for method, _, auth in fake_hub.requests if method == "POST"} == {"Bearer hf_secret"}
    assert fake_hub.commits == 2  # each checkpoint landed as one commit: its meta never before its weights
    repo = fake_hub.repos["org/name"]
    sft_files = {k: v for k, v in local_files(_isolated_base_dir).items() if not k.startswith("base_")}
    assert {k.removeprefix("run1/"): v for k, v in repo.items()} == sft_files

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(fresh))
    assert hub.main(["pull", "hf://org/name/run1"]) == 0  # the latest complete step: 4
    assert local_files(fresh) == {k: v for k, v in sft_files.items() if "000002" not in k}
    model, _, meta = load_model("sft", "cpu", "eval")
    assert meta["step"] == 4


def test_pull_refuses_a_different_local_tokenizer_and_ambiguous_folders(machine, tmp_path, monkeypatch, capsys):
    base_dir, corpus = machine
    url = f"file://{tmp_path}/remote"
    for tag in ("a", "b"):
        base_train.main(TINY + ["--data-dir", corpus, "--num-iterations", "1", "--model-tag", tag, "--push-to", url])
    capsys.readouterr()
    assert hub.main(["pull", url]) == 2
    assert "pick one with --source base --model-tag a; --source base --model-tag b" in capsys.readouterr().err
    with open(os.path.join(base_dir, "tokenizer", "tokenizer.pkl"), "ab") as f:
        f.write(b"different")
    assert hub.main(["pull", url, "--model-tag", "a"]) == 2
    assert "differs from the remote's tokenizer/tokenizer.pkl" in capsys.readouterr().err
    assert hub.main(["pull", url, "--model-tag", "a", "--force"]) == 0


def test_pull_skips_a_step_whose_optimizer_shards_are_not_all_there(machine, tmp_path, monkeypatch):
    """Several nodes push their own shards: a step whose meta landed before another node's shard is passed over."""
    base_dir, corpus = machine
    remote_dir = tmp_path / "remote"
    base_train.main(TINY + ["--data-dir", corpus, "--num-iterations", "4", "--save-every", "2",
                            "--push-to", f"file://{remote_dir}"])
    folder = remote_dir / "base_checkpoints" / "d2"
    meta = json.loads((folder / "meta_000004.json").read_text())
    (folder / "meta_000004.json").write_text(json.dumps({**meta, "world_size": 2}))  # rank 1's shard never came
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(fresh))
    assert hub.main(["pull", f"file://{remote_dir}"]) == 0
    assert sorted(os.listdir(fresh / "base_checkpoints" / "d2")) == ["meta_000002.json", "model_000002.pt",
                                                                      "optim_000002_rank0.pt"]


def test_push_of_a_saved_checkpoint_uploads_every_rank_shard(machine, tmp_path):
    """`hub push` runs as one process, not as the run that saved the step: it uploads every rank's shard."""
    base_dir, corpus = machine
    base_train.main(TINY + ["--data-dir", corpus, "--num-iterations", "1"])
    folder = os.path.join(base_dir, "base_checkpoints", "d2")
    shutil.copy(os.path.join(folder, "optim_000001_rank0.pt"), os.path.join(folder, "optim_000001_rank1.pt"))
    meta_file = os.path.join(folder, "meta_000001.json")
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, "w") as f:
        json.dump({**meta, "world_size": 2}, f)  # as a 2-rank run saves it
    url = f"file://{tmp_path}/remote"
    assert hub.push_existing(url, "base") == []
    assert {"base_checkpoints/d2/optim_000001_rank0.pt", "base_checkpoints/d2/optim_000001_rank1.pt",
            "base_checkpoints/d2/model_000001.pt", "base_checkpoints/d2/meta_000001.json"} <= set(remote_files(url))


def test_bad_push_urls_are_refused_before_training(machine, capsys):
    for url, message in [("nosuch://x", "unknown storage protocol nosuch://"), ("hf://justname", "hf://<org>/<name>")]:
        with pytest.raises(SystemExit) as exit_info:
            base_train.main(TINY + ["--push-to", url])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(machine[0], "base_checkpoints"))
