"""
HumanEval: 164 Python function-completion problems (https://huggingface.co/datasets/openai/openai_humaneval).
Graded by running the model's code against the problem's tests in nanochat.execution's sandbox.
Local data: NANOCHAT_TASK_DATA_HUMANEVAL or data_path= (e.g. HumanEval.jsonl).
"""

import re

from nanochat.execution import execute_code
from tasks.common import RowsTask
from tasks.hub import load_task_rows

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a prompt (comments and blank lines skipped, stop at the first code line)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith("import ") or stripped.startswith("from "):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ```python / ``` fenced block of a completion, or the whole completion if it has none."""
    blocks = CODE_BLOCK_RE.findall(completion)
    return blocks[0].strip() if blocks else completion.strip()


class HumanEval(RowsTask):
    eval_type = "generative"

    def __init__(self, data_path=None, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_task_rows("humaneval", "openai/openai_humaneval", "openai_humaneval", "test",
                                   data_path=data_path, default_config="openai_humaneval",
                                   extra_filenames=("HumanEval.jsonl", "HumanEval.jsonl.gz"))

    def get_example(self, index):
        row = self.rows[index]
        prompt = row["prompt"]  # imports + signature + docstring
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"{prompt}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, completion):
        """True if the completion's program passes the problem's tests."""
        # the completion usually holds the whole function but may miss the prompt's imports, so add them
        imports = extract_imports(conversation["messages"][0]["content"])
        program = (imports + "\n\n" + extract_program(completion) + "\n\n" + conversation["test"] + "\n"
                   + f"check({conversation['entry_point']})")
        return execute_code(program).success
