"""Tests are hermetic: every test gets its own NANOCHAT_BASE_DIR and a fixed fp32 compute dtype.

This file is the one home of what tests build (tests never import from each other):
- byte_tokenizer, random_prompt: a byte-level stand-in tokenizer (no training) for inference tests;
- build_gpt, build_tiny_gpt, build_random_gpt: tiny GPTs, as init leaves them or with every parameter random;
- tiny_words, tiny_docs, tiny_tokenizer, tiny_chat_tokenizer, save_tokenizer, write_tiny_corpus: real BPE
  tokenizers and tiny data;
- base, save_model_checkpoint, build_tiny_checkpoint: base dirs and checkpoints as the trainers leave them;
- search_docs: a local search provider; file_server: a local HTTP server (hub downloads are tested against it).
"""
import atexit
import base64
import csv
import dataclasses
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

import pyarrow as pa
import pyarrow.parquet as pq
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
# What tests build. nanochat is imported here, below the environment set-up at the top (the compute dtype is fixed
# when nanochat.common is first imported).

from nanochat.checkpoint_manager import save_checkpoint  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer, save_token_bytes  # noqa: E402
from nanochat.web_search import LocalSearchProvider  # noqa: E402


# A byte-level stand-in tokenizer for inference tests (engine, batching, decoding, streaming, data loading)

SPECIAL_NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, the 9 special tokens follow (256..264); RustBPETokenizer's methods that inference and
    data loading call, no chat rendering. decode drops the special tokens."""

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

    def encode(self, text, prepend=None, append=None, num_threads=None):
        """str -> ids; a list of str -> a list of ids (as RustBPETokenizer.encode)."""
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        if prepend is not None:
            ids = [prepend if isinstance(prepend, int) else self.special[prepend]] + ids
        if append is not None:
            ids = ids + [append if isinstance(append, int) else self.special[append]]
        return ids

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def random_prompt(byte_tokenizer):
    """prompt(n, seed=0) -> <|bos|> and n - 1 random bytes."""
    def prompt(n, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return [byte_tokenizer.get_bos_token_id()] + torch.randint(0, 256, (n - 1,), generator=gen).tolist()
    return prompt


# Tiny GPTs

@torch.no_grad()
def randomize_parameters(model, seed):
    """Every parameter random and non-zero, drawn from `seed`: init_weights zeroes the output projections and
    smear, which would hide bugs in attention, MLP, smear, value embeddings and backout."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            scale = 1.0 if "wte" in name or "value_embeds" in name else p.size(1) ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        else:
            p.copy_(0.5 + 0.3 * torch.rand(p.shape, generator=gen))  # lambdas and gates: all positive, none zero


@pytest.fixture(scope="session")
def build_gpt():
    """build(config, seed=0, randomize=False) -> a GPT on the CPU, its init_weights() drawn after
    torch.manual_seed(seed) (tests of init's values and of training from init use this); randomize=True then gives
    every parameter a random non-zero value (randomize_parameters) and returns it in eval mode."""
    def build(config, seed=0, randomize=False):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        if randomize:
            randomize_parameters(model, seed)
            model.eval()
        return model
    return build


@pytest.fixture(scope="session")
def build_tiny_gpt(build_gpt):
    """build(sequence_len, vocab_size, seed=0) -> a 2-layer, 32-wide GPT (full-context attention) as init leaves it."""
    def build(sequence_len, vocab_size, seed=0):
        return build_gpt(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2,
                                   n_kv_head=2, n_embd=32, window_pattern="L"), seed)
    return build


@pytest.fixture(scope="session")
def build_random_gpt(build_gpt):
    """build(seed=0, sequence_len=64, vocab_size=265, short_window=8) -> a 3-layer GPT with GQA, a short window (that
    decoding runs past), value embeddings, and every parameter random, in eval mode. 265: the byte tokenizer's."""
    def build(seed=0, sequence_len=64, vocab_size=256 + len(SPECIAL_NAMES), short_window=8):
        config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                           n_embd=64, window_pattern="SL", short_window=short_window)
        return build_gpt(config, seed, randomize=True)
    return build


# Tiny real tokenizers

@pytest.fixture(scope="session")
def tiny_words():
    """The words of the tiny docs (a list: take a copy to change it)."""
    return "the cat sat on a mat and then it ran far away from home to see the big red sun in the sky".split()


@pytest.fixture(scope="session")
def tiny_docs(tiny_words):
    """docs(n, seed, words=tiny_words) -> n documents of 5 to 60 words drawn from `words`."""
    def docs(n, seed, words=tiny_words):
        rng = random.Random(seed)
        return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_docs):
    """A 300-token BPE tokenizer trained on 300 tiny docs (shared: never save or change it in place)."""
    return RustBPETokenizer.train_from_iterator(iter(tiny_docs(300, 0)), 300)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """A 300-token BPE tokenizer of one chat-like line with numbers and multi-byte characters (é, ï, 東京, 🙂), for
    the chat front ends (shared: never save or change it in place)."""
    texts = ["hello there, how are you? I am fine. numbers 1 2 3 + 4 = 7. café naïve 東京 🙂"] * 30
    return RustBPETokenizer.train_from_iterator(iter(texts), 300)


@pytest.fixture(scope="session")
def save_tokenizer():
    """save(tokenizer, base_dir) -> base_dir/tokenizer holding the tokenizer and its token_bytes, as tok_train
    leaves them."""
    def save(tokenizer, base_dir):
        tokenizer_dir = os.path.join(base_dir, "tokenizer")
        tokenizer.save(tokenizer_dir)
        save_token_bytes(tokenizer, tokenizer_dir)
        return tokenizer_dir
    return save


@pytest.fixture
def base(_isolated_base_dir, tiny_tokenizer, save_tokenizer):
    """This test's NANOCHAT_BASE_DIR (a str) holding tiny_tokenizer as tok_train leaves it: where a run starts."""
    save_tokenizer(tiny_tokenizer, _isolated_base_dir)
    return str(_isolated_base_dir)


@pytest.fixture(scope="session")
def write_tiny_corpus(tiny_docs):
    """write(directory) -> directory, holding 3 parquet shards of 60 tiny docs (text column, row groups of 20);
    the last shard is val."""
    def write(directory):
        os.makedirs(directory, exist_ok=True)
        for i in range(3):
            table = pa.table({"text": tiny_docs(60, seed=100 + i)})
            pq.write_table(table, os.path.join(directory, f"shard_{i:05d}.parquet"), row_group_size=20)
        return str(directory)
    return write


# Tiny checkpoints

@pytest.fixture(scope="session")
def save_model_checkpoint():
    """save(checkpoint_dir, step, model, meta=None): the model's weights as checkpoint `step`, no optimizer state,
    meta holding step and model_config (plus `meta`)."""
    def save(checkpoint_dir, step, model, meta=None):
        meta = {"step": step, "model_config": dataclasses.asdict(model.config), **(meta or {})}
        save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return save


@pytest.fixture(scope="session")
def build_tiny_checkpoint(build_tiny_gpt, save_tokenizer, save_model_checkpoint):
    """build(base_dir, tokenizer, sequence_len, checkpoint_dir, step, meta=None): a run as the trainers leave it in
    base_dir: the tokenizer (save_tokenizer) and a tiny GPT over it (build_tiny_gpt) as the checkpoint
    base_dir/checkpoint_dir/<step> (save_model_checkpoint)."""
    def build(base_dir, tokenizer, sequence_len, checkpoint_dir, step, meta=None):
        save_tokenizer(tokenizer, base_dir)
        model = build_tiny_gpt(sequence_len, tokenizer.get_vocab_size())
        save_model_checkpoint(os.path.join(base_dir, checkpoint_dir), step, model, meta)
    return build


# A local search provider

@pytest.fixture
def search_docs(tmp_path):
    """A LocalSearchProvider over three short documents: Oslo's weather today, its mayor, the price of tea."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "weather_oslo.md").write_text("# Weather in Oslo today\n\nOslo: light rain, 14 degrees.\n")
    (folder / "mayor_oslo.md").write_text("# Mayor of Oslo: Ingrid Berg\n\nIngrid Berg has been mayor since 2023.\n")
    (folder / "price_tea.txt").write_text("Tea price today\n\nGreen tea costs 4 crowns a cup.\n")
    return LocalSearchProvider(str(folder), cache_dir=str(tmp_path / "index"))


# -----------------------------------------------------------------------------
# A local HTTP file server (nothing in the tests reaches the network)

class FileServer:
    """Serves `files` (path -> bytes, or a JSON-able value served as JSON). `faults` (path -> list) scripts the
    answers to successive GETs of a path: an int status (e.g. 500), "truncate" (Content-Length of the full answer,
    then half the body and hang up), "ok". Once a path's script is used up, it is served normally. Range requests
    are honoured when support_range is set. Every request is logged as (path, Range header or None, dest existed at
    that moment)."""

    def __init__(self, files, faults=None, support_range=True, watch=None, delay=0.0):
        self.files, self.faults = files, {k: list(v) for k, v in (faults or {}).items()}
        self.support_range, self.watch, self.delay = support_range, watch, delay
        self.log = []
        self.lock = threading.Lock()
        self.closed = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                with server.lock:
                    script = server.faults.get(self.path)
                    action = script.pop(0) if script else "ok"
                    server.log.append((self.path, self.headers.get("Range"),
                                       server.watch is not None and os.path.exists(server.watch)))
                if self.path not in server.files:
                    action = 404
                if isinstance(action, int):
                    self.send_response(action)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files[self.path]
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                start = 0
                rng = self.headers.get("Range")
                if rng and server.support_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.delay:
                    time.sleep(server.delay)
                if action == "truncate":
                    self.wfile.write(part[:len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def requests(self):
        """The paths asked for, in order."""
        return [path for path, _, _ in self.log]

    def gets(self, path):
        return [entry for entry in self.log if entry[0] == path]

    def close(self):
        if not self.closed:
            self.closed = True
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def file_server():
    """serve(files, faults=None, support_range=True, watch=None, delay=0.0) -> a started FileServer (its .url);
    every server still open is closed when the test ends."""
    servers = []

    def serve(files, **kwargs):
        servers.append(FileServer(files, **kwargs))
        return servers[-1]
    yield serve
    for server in servers:
        server.close()


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


# -----------------------------------------------------------------------------
# Two gloo ranks on this machine

MAIN_DRIVER = """
import importlib, json, os, sys
result = importlib.import_module(sys.argv[1]).main(json.loads(sys.argv[2]))
if os.environ["RANK"] == "0":
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)
"""


@pytest.fixture
def torchrun_two_ranks(tmp_path):
    """run(driver_source, *driver_args) -> (stdout, stderr): the driver script run by `torchrun --standalone
    --nproc_per_node 2` from the repo root, one thread per rank; fails the test with its output if it fails.
    MAIN_DRIVER is a driver for a script's main(argv): it takes `scripts.X`, the argv as JSON and a path, and
    rank 0 writes main's result there as JSON."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(driver_source, *driver_args):
        driver = tmp_path / f"driver_{len(list(tmp_path.glob('driver_*.py')))}.py"
        driver.write_text(driver_source)
        env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(driver), *map(str, driver_args)], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, proc.stderr
    run.MAIN_DRIVER = MAIN_DRIVER
    return run
