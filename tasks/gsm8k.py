"""
GSM8K grade-school math (https://huggingface.co/datasets/openai/gsm8k).

Example answer:
    Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
    Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.
    #### 10

The <<expr=result>> annotations are calculator calls: we turn each into a python part (expr) followed by
a python_output part (result), so the model learns to call the tool and reads the result back.
Local data: NANOCHAT_TASK_DATA_GSM8K or data_path= (e.g. a folder with train.jsonl).
"""

import re

from tasks.common import RowsTask, extract_answer, same_number
from tasks.hub import load_task_rows

TOOL_CALL_RE = re.compile(r"(<<[^>]+>>)")


def answer_to_parts(answer):
    """GSM8K answer text → assistant parts: text, and python/python_output for every <<expr=result>>."""
    parts = []
    for piece in TOOL_CALL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})  # may be "" (kept: renders to no tokens)
    return parts


class GSM8K(RowsTask):
    eval_type = "generative"

    def __init__(self, subset, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic"), f"GSM8K subset must be main|socratic, got {subset}"
        assert split in ("train", "test"), f"GSM8K split must be train|test, got {split}"
        self.subset = subset
        self.split = split
        self.rows = load_task_rows("gsm8k", "openai/gsm8k", subset, split, data_path=data_path, default_config="main")

    def get_example(self, index):
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        """1 if the completion's #### number equals the reference's as a number (1,234 == 1234, 18.0 == 18)."""
        assert isinstance(assistant_response, str), "GSM8K grades plain-string completions"
        assistant_message = conversation["messages"][-1]
        assert assistant_message["role"] == "assistant", "last message must be the assistant's"
        assert isinstance(assistant_message["content"], list), "GSM8K reference answers are lists of parts"
        ref_num = extract_answer(assistant_message["content"][-1]["text"])  # the last text part holds '#### N'
        pred_num = extract_answer(assistant_response)
        return int(same_number(pred_num, ref_num))
