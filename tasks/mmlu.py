"""
MMLU: 57-subject multiple choice questions (https://huggingface.co/datasets/cais/mmlu).
Categorical: the model answers with one of the letters A-D.
Local data: NANOCHAT_TASK_DATA_MMLU or data_path= (e.g. a folder with dev.jsonl / validation.jsonl).
"""

from tasks.common import RowsTask, render_mc
from tasks.hub import load_task_rows


class MMLU(RowsTask):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D")
    groups = ("abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
              "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
              "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
              "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
              "high_school_biology", "high_school_chemistry", "high_school_computer_science",
              "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
              "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
              "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
              "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
              "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
              "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
              "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
              "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
              "world_religions")

    def __init__(self, subset, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), f"MMLU subset must be all|auxiliary_train, got {subset}"
        # the 99.8K auxiliary training questions: MMLU("auxiliary_train", "train") or, as newer nanochat
        # spells it, MMLU("all", "auxiliary_train") (the hub's "all" config carries them as a split too)
        splits = ("train",) if subset == "auxiliary_train" else ("validation", "dev", "test", "auxiliary_train")
        assert split in splits, f"MMLU {subset} split must be one of {'|'.join(splits)}, got {split}"
        self.subset = subset
        self.split = split
        self.rows = load_task_rows("mmlu", "cais/mmlu", subset, split, data_path=data_path, default_config="all")

    def get_example(self, index):
        row = self.rows[index]
        if "train" in row and isinstance(row["train"], dict):
            row = row["train"]  # auxiliary_train rows come wrapped in an extra {"train": {...}} field
        choices = row["choices"]
        assert len(choices) == 4, f"MMLU should have 4 choices, got {len(choices)}"
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
            {"role": "assistant", "content": self.letters[row["answer"]]},
        ]
        # subject: for per-subject metrics; letters: lets the evaluator clamp the prediction to A-D
        return {"messages": messages, "subject": row.get("subject", ""), "letters": self.letters}

    def evaluate(self, conversation, assistant_response):
        assert assistant_response in self.letters, f"MMLU answer {assistant_response!r} is expected to be one of {self.letters}"
        return assistant_response == conversation["messages"][-1]["content"]
