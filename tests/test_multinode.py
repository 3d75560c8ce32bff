"""Multi-node training as the README runs it: two torchrun agents, one process each, meet at a c10d rendezvous on
loopback and train base_train over gloo as two "nodes". Same losses as one process with gradient accumulation,
and each node uploads its own optimizer shard with --push-to."""
import json
import os
import socket
import subprocess
import sys

import pytest

from nanochat.tokenizer import RustBPETokenizer, save_token_bytes
from scripts import base_train

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--window-pattern", "L",
        "--device-batch-size", "2", "--total-batch-size", "128", "--core-metric-every", "-1", "--sample-every", "-1",
        "--eval-every", "-1", "--warmup-steps", "2", "--compile", "0", "--synthetic-data", "--num-iterations", "4"]


def write_tokenizer(base_dir):
    tokenizer = RustBPETokenizer.train_from_iterator(iter(["the cat sat on the mat"] * 50), 300)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    save_token_bytes(tokenizer, os.path.join(base_dir, "tokenizer"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node_rank, port, argv):
    """One node's torchrun: the README's command with loopback addresses (node 0 hosts the rendezvous store)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "nanochat-test", "--rdzv-conf", f"is_host={node_rank == 0},join_timeout=300",
            "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "scripts.base_train", "--", *argv]


def test_two_nodes_train_like_one_process(_isolated_base_dir, tmp_path, monkeypatch):
    # one process, two micro-steps per step
    write_tokenizer(_isolated_base_dir)
    single = base_train.main(TINY)
    assert single["grad_accum_steps"] == 2

    # two nodes of one process each, one micro-step per step, sharing a base dir (a shared file system)
    cluster = tmp_path / "cluster"
    write_tokenizer(cluster)
    remote = tmp_path / "remote"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(cluster), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    port = free_port()
    argv = TINY + ["--push-to", f"file://{remote}"]
    nodes = [subprocess.Popen(node_command(r, port, argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [node.communicate(timeout=420)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    assert "world size: 2" in outputs[0] and "gradient accumulation steps: 1" in outputs[0]

    with open(cluster / "report" / "series.jsonl") as f:
        points = [json.loads(line) for line in f]
    losses = {p["step"]: p["value"] for p in points if p["name"] == "train loss"}
    assert sorted(losses) == [0, 1, 2, 3]
    for step, loss in single["losses"].items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    pushed = sorted(os.listdir(remote / "base_checkpoints" / "d2"))
    assert pushed == ["meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt", "optim_000004_rank1.pt"]
    assert json.loads((remote / "base_checkpoints" / "d2" / "meta_000004.json").read_text())["world_size"] == 2
