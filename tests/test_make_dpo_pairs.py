"""make_dpo_pairs on a tiny model: reference answers become `chosen`, the model's own samples (the Engine's, same
seed) `rejected`; a sample equal to the reference, a reference the SFT filter drops and a prompt that fills the
context are dropped and counted; the output loads as DPO pairs; bad input rows fail with file:line."""
import json
import os

import pytest

from nanochat.chat_format import assistant_content, assistant_parts_from_tokens
from nanochat.checkpoint_manager import load_model
from nanochat.dpo import load_pairs_jsonl
from nanochat.engine import Engine
from scripts import make_dpo_pairs

WORDS = "the cat sat on a mat and then it ran far away from home to see the big red sun in the sky".split()
LONG_ANSWER = "The cat sat on the mat, and then it ran far away from home to see the big red sun in the sky."


@pytest.fixture
def sft(_isolated_base_dir, build_tiny_checkpoint, tiny_tokenizer):
    build_tiny_checkpoint(str(_isolated_base_dir), tiny_tokenizer, 64, os.path.join("chatsft_checkpoints", "d2"), 0)
    return _isolated_base_dir


def greedy_answer(prompt_text, max_tokens):
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    ids = tokenizer.render_for_completion([{"role": "user", "content": prompt_text}])
    results, _ = Engine(model, tokenizer).generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
    return assistant_content(assistant_parts_from_tokens(tokenizer, results[0][len(ids):]))


def test_pairs_from_reference_answers_and_the_models_samples(sft, tmp_path, capsys):
    greedy = greedy_answer("the sun", 48)
    rows = [
        [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": LONG_ANSWER}],
        {"prompt": "the big red", "chosen": LONG_ANSWER + " Yes.", "rejected": "ignored"},
        {"messages": [{"role": "user", "content": "the sun"}, {"role": "assistant", "content": greedy}]},
        [{"role": "user", "content": "a mat"}, {"role": "assistant", "content": "Too short."}],
        [{"role": "user", "content": "the sky"}, {"role": "assistant", "content": "<b>Bold</b> " + LONG_ANSWER}],
        [{"role": "user", "content": " ".join(WORDS * 3)}, {"role": "assistant", "content": LONG_ANSWER}],
    ]
    src = tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    argv = ["--input", str(src), "--output", str(out), "--device-type", "cpu", "-t", "0", "-m", "48"]
    assert make_dpo_pairs.main(argv) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["prompts"] == 6 and counts["pairs"] == 2
    assert (counts["dropped_same_answer"], counts["dropped_too_short"], counts["dropped_html_tags"],
            counts["dropped_long_prompt"]) == (1, 1, 1, 1)
    pairs = load_pairs_jsonl(str(out))
    assert [p["prompt"][0]["content"] for p in pairs] == ["the cat", "the big red"]
    assert [p["chosen"][0]["content"] for p in pairs] == [LONG_ANSWER, LONG_ANSWER + " Yes."]
    assert [p["rejected"][0]["content"] for p in pairs] == [greedy_answer("the cat", 48),
                                                       greedy_answer("the big red", 48)]
    assert os.path.exists(os.path.join(sft, "report", "dpo-pairs.md"))

    # --offset/--limit cut a slice; switching a rule off keeps its rows; several samples per prompt
    assert make_dpo_pairs.main(argv[:4] + ["--device-type", "cpu", "-m", "8", "--offset", "3", "--limit", "2",
                                           "--disable", "too_short", "--num-samples", "3"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["prompts"] == 2 and counts["dropped_html_tags"] == 3 and counts["pairs"] == 3
    assert "dropped_too_short" not in counts


def test_bad_rows_fail_with_file_and_line_before_any_sampling(sft, tmp_path, capsys):
    src = tmp_path / "answers.jsonl"
    src.write_text(json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": LONG_ANSWER}]) + "\n"
                   + json.dumps([{"role": "user", "content": "q"}]) + "\n{nope\n"
                   + json.dumps({"prompt": "q", "rejected": "r"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert make_dpo_pairs.main(["--input", str(src), "--output", str(out), "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: the conversation must end with the assistant's reference answer" in err
    assert f"{src}:3: invalid JSON" in err and f"{src}:4: missing 'chosen'" in err
    assert not out.exists()
