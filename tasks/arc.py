"""
ARC (AI2 Reasoning Challenge), Easy and Challenge sets (https://huggingface.co/datasets/allenai/ai2_arc).
Categorical: the model answers with one of the item's letters (usually A-D, sometimes 1-4 or 5 options).
Local data: NANOCHAT_TASK_DATA_ARC or data_path= (e.g. a folder with ARC-Easy-validation.jsonl).
"""

from tasks.common import RowsTask, render_mc
from tasks.hub import load_task_rows


class ARC(RowsTask):
    eval_type = "categorical"

    def __init__(self, subset, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), f"ARC subset must be ARC-Easy|ARC-Challenge, got {subset}"
        assert split in ("train", "validation", "test"), f"ARC split must be train|validation|test, got {split}"
        self.subset = subset
        self.split = split
        self.rows = load_task_rows("arc", "allenai/ai2_arc", subset, split, data_path=data_path)

    def get_example(self, index):
        row = self.rows[index]
        choices = row["choices"]["text"]
        letters = row["choices"]["label"]
        answer = row["answerKey"]
        assert answer in letters, f"ARC answer {answer} must be one of {letters}"
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, choices)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        letters = conversation["letters"]
        assert assistant_response in letters, f"ARC answer {assistant_response!r} is expected to be one of {letters}"
        return assistant_response == conversation["messages"][-1]["content"]
