"""The recipes in runs/ end to end in their tiny mode (toy sizes on the CPU, offline): speedrun.sh stage by stage,
miniseries.sh and scaling_laws.sh with their CSV rows checked against the checkpoints they describe (and a
second run that skips what is done), gpu_check.sh --dry-run, and the decode bytes behind MBU."""
import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from dev.bench_engine import decode_bytes_per_step
from nanochat.engine import KVCache
from nanochat.series import has_row

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Simple generated English as jsonl (the last file is the val split), and a word list for SpellingBee."""
    root = tmp_path_factory.mktemp("recipe_data")
    rng = random.Random(0)
    subjects = ["The cat", "A small dog", "My friend", "The teacher", "A robot", "The old man"]
    verbs = ["likes", "sees", "finds", "counts", "reads", "draws"]
    objects = ["three apples", "a red ball", "the blue sky", "twelve books", "a long word", "the numbers 4 and 5"]
    (root / "text").mkdir()
    for i in range(3):
        docs = [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                         for _ in range(rng.randint(2, 8))) for _ in range(300)]
        (root / "text" / f"part_{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "words.txt").write_text("\n".join(["cat", "dog", "apple", "robot", "teacher", "sky", "book", "word"]))
    return root


def run_recipe(script, base_dir, cwd, corpus, *args, **env):
    """bash runs/<script> with the test's Python, base dir and data; returns the output (asserting success)."""
    env = dict(os.environ, PY=sys.executable, NANOCHAT_BASE_DIR=str(base_dir), DATA_DIR=str(corpus / "text"),
               NANOCHAT_WORDS_FILE=str(corpus / "words.txt"), **env)
    env.pop("PYTHONPATH", None)  # the recipe must make the repo importable itself
    proc = subprocess.run(["bash", os.path.join(REPO, "runs", script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_speedrun_tiny(corpus, tmp_path):
    base = tmp_path / "base"
    log = run_recipe("speedrun.sh", base, tmp_path, corpus, "--tiny")
    for stage in ["report reset", "tokenizer", "tokenizer eval", "base model (d2)", "base eval", "SFT", "chat eval",
                  "report"]:
        assert f"=== [speedrun] {stage}: " in log, stage
    assert sorted(os.listdir(base / "base_checkpoints" / "d2"))[-1] == "optim_000020_rank0.pt"
    assert os.path.exists(base / "chatsft_checkpoints" / "d2" / "meta_000010.json")
    report = (tmp_path / "report.md").read_text()  # copied to where the recipe was started, not into the repo
    for section in ["Base model training", "Base model evaluation", "Chat SFT", "Chat evaluation sft"]:
        assert section in report, section


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def saved_params(base, tag, step):
    weights = torch.load(base / "base_checkpoints" / tag / f"model_{step:06d}.pt", map_location="cpu")
    return sum(t.numel() for t in weights.values())


def test_miniseries_and_scaling_laws_tiny(corpus, tmp_path, write_eval_bundle):
    base = tmp_path / "base"
    write_eval_bundle(base / "eval_bundle")  # so the series computes CORE (on three toy tasks)
    log = run_recipe("miniseries.sh", base, tmp_path, corpus, "--tiny", "s1")
    results = base / "s1_miniseries_results"
    rows = read_csv(results / "results.csv")
    assert [r["depth"] for r in rows] == ["2", "3"] and os.path.getsize(results / "results.png") > 10_000
    for row in rows:
        tag, step = f"s1_d{row['depth']}", int(row["num_iterations"])
        meta = json.loads((base / "base_checkpoints" / tag / f"meta_{step:06d}.json").read_text())
        assert int(row["params_total"]) == saved_params(base, tag, step)
        assert int(row["tokens_trained"]) == step * meta["total_batch_size"] == step * 256
        assert float(row["total_flops"]) == pytest.approx(float(row["flops_per_token"]) * step * 256, rel=1e-6)
        assert float(row["val_bpb"]) == pytest.approx(meta["val_bpb"], abs=1e-6)
        assert float(row["core_score"]) == pytest.approx(meta["core_metric"], abs=1e-6)
        # the horizon came from tokens:params 0.02 of the scaling parameters
        assert float(row["param_data_ratio"]) == pytest.approx(0.02, abs=256 / int(row["num_scaling_params"]))
    assert "=== [miniseries] d3: " in log

    again = run_recipe("miniseries.sh", base, tmp_path, corpus, "s1", TINY="1")  # TINY=1 works like --tiny
    assert "d2 is already in" in again and "d3 is already in" in again and "tokenizer: keeping" in again
    assert read_csv(results / "results.csv") == rows

    run_recipe("scaling_laws.sh", base, tmp_path, corpus, "--tiny", "t1")
    results = base / "scaling_laws_results_t1"
    rows = read_csv(results / "results.csv")
    assert [(r["flops_budget"], r["depth"]) for r in rows] == [("5e9", "2"), ("5e9", "3"), ("1e10", "2"), ("1e10", "3")]
    for row in rows:  # each run trained on its budget, to within one step
        step_flops = float(row["flops_per_token"]) * 256
        assert abs(float(row["total_flops"]) - float(row["flops_budget"])) <= step_flops
    assert has_row(results / "results.csv", {"flops_budget": "1.0e10", "depth": "3"})
    assert not has_row(results / "results.csv", {"flops_budget": "1e10", "depth": "4"})
    assert os.path.getsize(results / "isoflops.png") > 10_000


def test_gpu_check_dry_run(tmp_path):
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, PY=sys.executable, NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    proc = subprocess.run(["bash", os.path.join(REPO, "runs", "gpu_check.sh"), "--dry-run", "--results", str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    steps = {line["step"]: line for line in lines}
    assert list(steps) == ["environment", "cuda_tests", "bench_train_d12", "bench_train_d20", "bench_train_d20_fp8",
                           "bench_engine", "train_d12", "serve"]
    assert all(line["status"] == "ok" for line in lines), [line for line in lines if line["status"] != "ok"]
    assert steps["cuda_tests"]["skipped"] >= 2  # collected, and skipped without a GPU
    assert steps["bench_train_d12"]["result"]["tok_per_sec"] > 0
    assert steps["bench_train_d20_fp8"]["command"].endswith("--fp8")
    assert {f"mbu_b{b}" for b in (1, 8, 32)} <= set(steps["bench_engine"]["result"])
    assert steps["train_d12"]["loss_last_tenth"] < steps["train_d12"]["loss_first5"]
    assert [level["clients"] for level in steps["serve"]["result"]["levels"]] == [2]


def test_decode_bytes_are_the_weights_once_plus_the_kv_cache(build_random_gpt):
    """Against a plain re-statement: every parameter's bytes, minus the embedding tables but for the looked-up
    rows, plus the bytes of a KV cache holding the context and the new token in every layer."""
    model = build_random_gpt(sequence_len=64, short_window=64)  # windows >= the context: every layer reads it all
    batch, context = 3, 20
    tables = [model.transformer.wte.weight, *[e.weight for e in model.value_embeds.values()]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= sum(t.numel() * t.element_size() - batch * t.shape[1] * t.element_size() for t in tables)
    cache = KVCache.for_model(model, batch, context + 1, device="cpu")
    kv = cache.k_cache.numel() * cache.k_cache.element_size() * 2
    assert decode_bytes_per_step(model, batch, context) == weights + kv
    short = build_random_gpt(sequence_len=64, short_window=8)  # layer 0 reads only its window
    assert decode_bytes_per_step(short, batch, context) == weights + kv // 3 * 2 + kv // 3 * 9 // 21
