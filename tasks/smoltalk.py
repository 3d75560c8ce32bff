"""
SmolTalk (smol version): general chat data (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk).
train ~460K conversations, test ~24K. Conversations may start with a system message.
Local data: NANOCHAT_TASK_DATA_SMOLTALK or data_path= (parquet/jsonl with a `messages` column).
"""

from tasks.common import RowsTask
from tasks.hub import load_task_rows


class SmolTalk(RowsTask):

    def __init__(self, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"SmolTalk split must be train|test, got {split}"
        self.split = split
        self.rows = load_task_rows("smoltalk", "HuggingFaceTB/smol-smoltalk", "default", split,
                                   data_path=data_path, default_config="default")

    def get_example(self, index):
        messages = self.rows[index]["messages"]
        # sanity checks: optional leading system message, then strictly user/assistant alternating strings
        assert len(messages) >= 1, "SmolTalk conversation is empty"
        rest = messages[1:] if messages[0]["role"] == "system" else messages
        assert len(rest) >= 2, "SmolTalk conversations must have at least 2 user/assistant messages"
        for i, message in enumerate(rest):
            expected = "user" if i % 2 == 0 else "assistant"
            assert message["role"] == expected, f"message {i} has role {message['role']} but should be {expected}"
            assert isinstance(message["content"], str), "SmolTalk message content must be a string"
        return {"messages": messages}
