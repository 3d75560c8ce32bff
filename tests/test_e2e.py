"""Micro end-to-end: tokenizer -> base model -> SFT -> chat, each through its real entry point (in-process),
on a few kilobytes of generated text. The SFT model must give the answer it was fine-tuned on, greedily."""
import io
import json
import os
import random

import pytest

pytestmark = pytest.mark.slow



def _write_corpus(data_dir, num_files=3, docs_per_file=200):
    """jsonl shards of simple generated English (the last file is the val split)."""
    rng = random.Random(0)
    subjects = ["The cat", "A small dog", "My friend", "The teacher", "A robot", "The old man"]
    verbs = ["likes", "sees", "finds", "counts", "reads", "draws"]
    objects = ["three apples", "a red ball", "the blue sky", "twelve books", "a long word", "the numbers 4 and 5"]
    os.makedirs(data_dir)
    for i in range(num_files):
        with open(os.path.join(data_dir, f"part_{i:02d}.jsonl"), "w") as f:
            for _ in range(docs_per_file):
                doc = " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                               for _ in range(rng.randint(2, 6)))
                f.write(json.dumps({"text": doc}) + "\n")


def test_tokenizer_base_sft_chat(tmp_path, _isolated_base_dir, capsys):
    from scripts import tok_train, base_train, chat_sft, chat_cli
    base = _isolated_base_dir
    data_dir = str(tmp_path / "corpus")
    _write_corpus(data_dir)

    # 1. tokenizer
    tok_train.main(["--vocab-size", "400", "--data-dir", data_dir])
    assert os.path.exists(base / "tokenizer" / "tokenizer.pkl")

    # 2. base model
    base_train.main(["--device-type", "cpu", "--data-dir", data_dir, "--depth", "2", "--aspect-ratio", "32",
                     "--head-dim", "32", "--window-pattern", "L", "--max-seq-len", "64",
                     "--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", "30",
                     "--warmup-steps", "5", "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
                     "--compile", "0"])
    assert os.path.isdir(base / "base_checkpoints" / "d2")

    # 3. SFT on a persona file (plus a few other conversations), inheriting from the base checkpoint
    persona = tmp_path / "persona.jsonl"
    rows = [[{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am nanochat."}]]
    rows += [[{"role": "user", "content": f"The cat sees {n} apples. How many?"},
              {"role": "assistant", "content": f"{n} apples."}] for n in range(3, 9)]
    persona.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = chat_sft.main(["--device-type", "cpu", "--custom-only", "--extra-train-jsonl", f"{persona}:40",
                            "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
                            "--num-iterations", "60", "--matrix-lr", "0.04", "--embedding-lr", "0.6",
                            "--unembedding-lr", "0.02", "--eval-every", "30", "--eval-tokens", "256",
                            "--chatcore-every", "-1"])
    assert result["val_bpb"] < 0.5 * json.loads(
        next(line for line in open(base / "report" / "series.jsonl") if '"val bpb"' in line and "Chat SFT" in line)
    )["value"]  # it learned the training conversations

    # 4. chat, greedy: the fine-tuned answer comes back
    capsys.readouterr()
    out = io.StringIO()
    chat_cli.main(["--device-type", "cpu", "-p", "What is your name?", "-t", "0", "-m", "16"], out=out)
    assert "nanochat" in out.getvalue()
