"""
Your own conversations from a JSONL file, one conversation per line, either shape:
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
Every line is validated (nanochat.chat_format); bad lines are reported as path:line: reason and nothing
is loaded, so no training run silently uses broken data.
"""

import os

from nanochat.chat_format import load_conversations_jsonl
from tasks.common import Task


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        if not os.path.exists(filepath):
            hint = ""
            if os.path.basename(filepath) == "identity_conversations.jsonl":
                hint = (" The default identity conversations can be fetched with: curl -L -o "
                        f"{filepath} https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl")
            raise FileNotFoundError(f"CustomJSON: {filepath} does not exist.{hint}")
        self.conversations = load_conversations_jsonl(filepath)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return dict(self.conversations[index])  # shallow copy: callers may add keys
