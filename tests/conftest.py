"""Tests are hermetic: every test gets its own NANOCHAT_BASE_DIR and a fixed fp32 compute dtype."""
import atexit
import base64
import csv
import hashlib
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from urllib.parse import unquote, urlparse

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
import yaml

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


def random_tiny_gpt(seed=0, sequence_len=64, vocab_size=256 + len(SPECIAL_NAMES), short_window=8):
    """A 3-layer GPT with GQA, a short window, value embeddings, and every parameter random and non-zero
    (so attention, smear, value embeddings and backout all matter)."""
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
    """random_tiny_gpt(seed=0, sequence_len=64, vocab_size=265, short_window=8) -> a random tiny GPT."""
    return random_tiny_gpt


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


# -----------------------------------------------------------------------------
# A writable Hugging Face hub on localhost: the calls huggingface_hub makes to create a repo, upload (preupload,
# then one ndjson commit with the files inline), list and download. Nothing is faked inside huggingface_hub.


class FakeHub:
    """State of the fake hub: repos {repo_id: {path: bytes}}, every request as (method, path, Authorization),
    and `fail_commits`: how many of the next commits answer HTTP 500."""

    def __init__(self):
        self.repos, self.requests, self.fail_commits, self.lock = {}, [], 0, threading.Lock()
        self.commits = 0

    @property
    def sha(self):
        return f"{self.commits:040x}"


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    hub = None  # set on the subclass each server gets

    def log_message(self, *args):
        pass

    def _send(self, status=200, body=b"", headers=None, send_body=True):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), "X-Repo-Commit": self.hub.sha, **(headers or {})}
        if status == 404:
            headers.setdefault("X-Error-Code", "RepoNotFound")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _record(self):
        path = urlparse(self.path).path
        self.hub.requests.append((self.command, path, self.headers.get("Authorization")))
        return unquote(path)

    def do_POST(self):
        path = self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub = self.hub
        with hub.lock:
            if path == "/api/repos/create":
                spec = json.loads(body)
                repo_id = f"{spec['organization']}/{spec['name']}"
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo"})
                hub.repos[repo_id] = {}
                return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/[^/]+", path)
            if match is None or match.group(1) not in hub.repos:
                return self._send(404, {"error": "Repository not found"})
            files = hub.repos[match.group(1)]
            if match.group(2) == "preupload":
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in json.loads(body)["files"]]})
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                return self._send(500, {"error": "injected failure"})
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._send(400, {"error": f"the fake hub takes inline files only, got {item['key']}"})
            hub.commits += 1
            return self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{match.group(1)}/commit/{hub.sha}",
                                    "commitOid": hub.sha, "pullRequestUrl": None})

    def do_GET(self):
        self._get(send_body=True)

    def do_HEAD(self):
        self._get(send_body=False)

    def _get(self, send_body):
        path = self._record()
        hub = self.hub
        with hub.lock:
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/[^/]+(/.*)?", path)
            if match:
                files = hub.repos.get(match.group(1))
                if files is None:
                    return self._send(404, {"error": "Repository not found"}, send_body=send_body)
                if match.group(2) == "revision":
                    return self._send(200, {"id": match.group(1), "sha": hub.sha,
                                            "siblings": [{"rfilename": p} for p in sorted(files)]}, send_body=send_body)
                prefix = (match.group(3) or "/").lstrip("/")
                return self._send(200, [{"type": "file", "path": p, "size": len(data),
                                         "oid": hashlib.sha1(data).hexdigest()}
                                        for p, data in sorted(files.items()) if p.startswith(prefix)],
                                  send_body=send_body)
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
            data = hub.repos.get(match.group(1), {}).get(match.group(2)) if match else None
            if data is None:
                return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"},
                                  send_body=send_body)
            return self._send(200, data, headers={"ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                              send_body=send_body)


@pytest.fixture
def fake_hub(monkeypatch):
    """A FakeHub served on localhost, with HF_ENDPOINT pointing at it for the test."""
    hub = FakeHub()
    handler = type("Handler", (_FakeHubHandler,), {"hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield hub
    server.shutdown()
    server.server_close()


# -----------------------------------------------------------------------------
# A CORE eval bundle in the real layout, tiny (three toy tasks): for CORE code paths without the download


def write_toy_eval_bundle(root):
    """A three-task bundle in the real layout: core.yaml, eval_meta_data.csv, eval_data/<uri>."""
    (root / "eval_data" / "sub").mkdir(parents=True)
    mc = [{"query": f"q{i}:", "choices": ["a", "b"], "gold": i % 2} for i in range(8)]
    schema = [{"context_options": [f"c{i}x", f"c{i}y"], "continuation": "end", "gold": 0} for i in range(6)]
    lm = [{"context": "ab:", "continuation": c} for c in ["cd", "ce", "cd", "zz"]]
    for name, rows in [("mc.jsonl", mc), ("sub/schema.jsonl", schema), ("lm.jsonl", lm)]:
        with open(root / "eval_data" / name, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    config = {"icl_tasks": [
        {"label": "toy_mc", "dataset_uri": "mc.jsonl", "num_fewshot": [2], "icl_task_type": "multiple_choice",
         "continuation_delimiter": "\nAnswer: "},
        {"label": "toy_schema", "dataset_uri": "sub/schema.jsonl", "num_fewshot": [0], "icl_task_type": "schema"},
        {"label": "toy_lm", "dataset_uri": "lm.jsonl", "num_fewshot": [1], "icl_task_type": "language_modeling"},
    ]}
    (root / "core.yaml").write_text(yaml.safe_dump(config))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline", "Centered Metric?", "Description"])
        w.writerow(["toy_mc", "x", "x", 2, 8, 50.0, "", ""])
        w.writerow(["toy_schema", "x", "x", 0, 6, 50.0, "", ""])
        w.writerow(["toy_lm", "x", "x", 1, 4, 0.0, "", ""])
    return {"toy_mc": mc, "toy_schema": schema, "toy_lm": lm}


@pytest.fixture
def write_eval_bundle():
    """write(root) -> {task label: rows}: a three-task CORE bundle (core.yaml, eval_meta_data.csv, eval_data/)."""
    return write_toy_eval_bundle
