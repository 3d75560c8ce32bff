"""
GPT-4-style byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

The saved form is nanochat's: `tokenizer/tokenizer.pkl` is a pickled `tiktoken.Encoding` named "rustbpe" whose
last 9 ids are the special tokens below, so a tokenizer trained by karpathy/nanochat loads here unchanged and
ours loads there. `tokenizer/token_bytes.pt` holds the number of UTF-8 bytes each id stands for (0 for specials),
used to report bits per byte.

Text handling:
- Any Python string encodes without error and decodes back to itself. The one exception is a string holding
  lone surrogates (e.g. "\\ud800", which cannot exist in UTF-8): each lone surrogate becomes U+FFFD before
  encoding (tiktoken's own rule), so decode(encode(s)) is s with those replaced. We never crash on them;
  training text gets the same treatment (rustbpe itself would raise).
- encode() never parses special-token text: a user who types "<|bos|>" gets the tokens of that literal text.
  Special tokens only enter a sequence through prepend/append, encode_special() or the conversation renderers.
"""

import copy
import hashlib
import os
import pickle

import rustbpe
import tiktoken
import torch

from nanochat.cli import MissingFileError, UserError
from nanochat.common import get_base_dir
from nanochat.fileio import atomic_open, remove_stale_temp_files

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the document delimiter in packed pretraining rows
    # the rest only appear in rendered conversations (SFT, RL, chat)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced into the sequence at inference time
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into groups of 1-2 digits (GPT-4: 1-3), which spends fewer
# merges on numbers at small vocab sizes (nanochat measured a slightly better val bpb: dev/PERF.md).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILENAME = "tokenizer.pkl"
TOKEN_BYTES_FILENAME = "token_bytes.pt"


class RustBPETokenizer:
    """A thin wrapper around a tiktoken Encoding, adding nanochat's special tokens and chat rendering."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self._special_id_cache = {}
        self.bos_token_id = self.encode_special(bos_token)

    # ------------------------------------------------------------------------------------------------
    # construction / persistence

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train byte-level BPE on an iterator of strings; the 9 special tokens take the last 9 ids."""
        num_merged_vocab = vocab_size - len(SPECIAL_TOKENS)
        if num_merged_vocab < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(_without_lone_surrogates(text_iterator), num_merged_vocab, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        # tiktoken needs ranks 0..n-1 with no holes, otherwise ids and ranks disagree
        assert sorted(mergeable_ranks.values()) == list(range(len(mergeable_ranks))), "rustbpe ranks are not contiguous"
        if len(mergeable_ranks) < num_merged_vocab:
            # rustbpe stops when no pair occurs any more (tiny corpus); the vocab is then smaller than asked
            print(f"WARNING: the training text only supported {len(mergeable_ranks)} of the {num_merged_vocab} "
                  f"requested byte/merge tokens; vocab size is {len(mergeable_ranks) + len(SPECIAL_TOKENS)} "
                  f"instead of {vocab_size}. Train on more text.")
        enc = build_encoding(mergeable_ranks, trainer.get_pattern())
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load `tokenizer_dir/tokenizer.pkl` (ours or nanochat's: both are a pickled tiktoken Encoding)."""
        pickle_path = os.path.join(tokenizer_dir, TOKENIZER_FILENAME)
        if not os.path.exists(pickle_path):
            raise MissingFileError(f"No tokenizer at {pickle_path}. Train one with `python -m scripts.tok_train` "
                                    f"(or copy a nanochat tokenizer/ folder there).")
        try:
            with open(pickle_path, "rb") as f:
                enc = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"{pickle_path} cannot be read ({type(e).__name__}: {e}): the file is truncated or "
                            f"damaged. Restore it from a copy of the tokenizer/ folder you trained with (a retrained "
                            f"tokenizer no longer matches the checkpoints trained with this one)") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise UserError(f"{pickle_path} holds a {type(enc).__name__}, not a tiktoken Encoding: it is not a "
                            f"nanochat tokenizer. Train one with `python -m scripts.tok_train`")
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A public tiktoken encoding such as "gpt2" or "cl100k_base" (needs its files: internet or TIKTOKEN_CACHE_DIR)."""
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except Exception as e:
            raise RuntimeError(f"Could not load tiktoken encoding {tiktoken_name!r}: {type(e).__name__}: {e}. "
                               f"tiktoken downloads it on first use; without internet, point TIKTOKEN_CACHE_DIR "
                               f"at a folder that already holds it.") from e
        # tiktoken calls its document delimiter <|endoftext|>; it plays the role of our <|bos|>
        return cls(enc, "<|endoftext|>")

    def save(self, tokenizer_dir):
        """Write `tokenizer_dir/tokenizer.pkl` (pickled tiktoken Encoding, nanochat's format), atomically."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        remove_stale_temp_files(tokenizer_dir)
        pickle_path = os.path.join(tokenizer_dir, TOKENIZER_FILENAME)
        with atomic_open(pickle_path, "wb") as f:
            pickle.dump(self.enc, f)
        print(f"Saved tokenizer encoding to {pickle_path}")
        return pickle_path

    # ------------------------------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def fingerprint(self):
        """A short hash of everything that decides how text becomes ids: the split pattern, every mergeable
        token's bytes and rank, and the special tokens' ids. Checkpoints record it (training.checkpoint_meta) and
        loading one with a different tokenizer is refused (checkpoint_manager.check_tokenizer_matches). These
        are the fields tiktoken itself pickles, so they are there for every Encoding."""
        digest = hashlib.sha256(self.enc._pat_str.encode("utf-8"))
        for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda item: item[1]):
            digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        for name, token_id in sorted(self.enc._special_tokens.items()):
            digest.update(f"\0{name}={token_id}".encode("utf-8"))
        return "sha256:" + digest.hexdigest()[:16]

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])

    def encode_special(self, text):
        # a dict rather than functools.lru_cache on the method, which would keep every tokenizer alive forever
        token_id = self._special_id_cache.get(text)
        if token_id is None:
            token_id = self.enc.encode_single_token(text)
            self._special_id_cache[text] = token_id
        return token_id

    def get_bos_token_id(self):
        return self.bos_token_id

    # ------------------------------------------------------------------------------------------------
    # encode / decode

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel by tiktoken's threads).

        prepend/append: a special token's name ("<|bos|>") or a token id, added to every sequence.
        """
        prepend_id = None if prepend is None else self._as_token_id(prepend)
        append_id = None if append is None else self._as_token_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
            return ids
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend_id is not None:
                for row in batch:
                    row.insert(0, prepend_id)
            if append_id is not None:
                for row in batch:
                    row.append(append_id)
            return batch
        raise ValueError(f"encode() takes a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def _as_token_id(self, token):
        if isinstance(token, int):
            return token
        return self.encode_special(token)

    # ------------------------------------------------------------------------------------------------
    # conversations

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize one conversation for SFT.

        conversation: {"messages": [...]} or a bare list of messages. Returns (ids, mask), two lists of equal
        length; mask 1 marks tokens the assistant is trained on. Layout (mask in brackets):
          <|bos|>[0]
          user:      <|user_start|>[0] text[0] <|user_end|>[0]
          assistant: <|assistant_start|>[0] then a string [1] or parts, then <|assistant_end|>[1]
            part text:          tokens[1]
            part python:        <|python_start|>[1] code[1] <|python_end|>[1]
            part python_output: <|output_start|>[0] output[0] <|output_end|>[0]  (the tool writes these)
        A leading system message is merged into the first user message as system + "\\n\\n" + user.
        <think>...</think> inside assistant text is ordinary text and is trained on.
        The result is cut to its first max_tokens tokens (None: no limit).
        """
        messages = _merge_system_message(_get_messages(conversation))
        ids, mask = [], []

        def add_tokens(token_ids, mask_val):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_val] * len(token_ids))

        special = self.encode_special
        user_start, user_end = special("<|user_start|>"), special("<|user_end|>")
        assistant_start, assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
        output_start, output_end = special("<|output_start|>"), special("<|output_end|>")

        add_tokens(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected_role = "user" if i % 2 == 0 else "assistant"
            role = message.get("role")
            if role != expected_role:
                raise ValueError(f"message {i} has role {role!r} but should be {expected_role!r}: a conversation is "
                                 f"an optional system message, then user/assistant turns alternating from user")
            content = message.get("content")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
                add_tokens(user_start, 0)
                add_tokens(self.encode(content), 0)
                add_tokens(user_end, 0)
                continue
            add_tokens(assistant_start, 0)
            if isinstance(content, str):
                add_tokens(self.encode(content), 1)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                        raise ValueError(f"message {i} part {j}: expected {{'type': ..., 'text': str}}, got {part!r}")
                    part_ids = self.encode(part["text"])
                    part_type = part.get("type")
                    if part_type == "text":
                        add_tokens(part_ids, 1)
                    elif part_type == "python":
                        add_tokens(python_start, 1)
                        add_tokens(part_ids, 1)
                        add_tokens(python_end, 1)
                    elif part_type == "python_output":
                        # produced by the tool at inference time, so never a training target
                        add_tokens(output_start, 0)
                        add_tokens(part_ids, 0)
                        add_tokens(output_end, 0)
                    else:
                        raise ValueError(f"message {i} part {j}: unknown part type {part_type!r} "
                                         f"(expected text, python or python_output)")
            else:
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
            add_tokens(assistant_end, 1)

        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt ids priming the assistant to answer: the conversation without its final assistant message
        (if it ends with one), followed by <|assistant_start|>. Used for evaluation, RL and chat.

        Unlike nanochat, the prompt is not truncated to 2048 tokens: cutting a prompt's tail would drop the
        question and still ask for an answer. Callers that need a limit check len(ids) themselves.
        """
        messages = list(_get_messages(conversation))  # shallow copy: we only drop the last element
        if messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages:
            raise ValueError("render_for_completion needs at least one user message")
        ids, _ = self.render_conversation(messages, max_tokens=None)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view of render_conversation: tokens joined by '|', green = trained on (mask 1), red = not."""
        RED, GREEN, GRAY, RESET = "\033[91m", "\033[92m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, mask_val in zip(ids, mask):
            color = GREEN if mask_val == 1 else RED
            piece = f"{color}{self.decode([token_id])}{RESET}"
            if with_token_id:
                piece += f"{GRAY}({token_id}){RESET}"
            pieces.append(piece)
        return "|".join(pieces)


# ----------------------------------------------------------------------------------------------------
# helpers

def build_encoding(mergeable_ranks, pattern=SPLIT_PATTERN):
    """The tiktoken Encoding nanochat builds: name "rustbpe", specials right after the mergeable tokens."""
    offset = len(mergeable_ranks)
    special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


def _replace_lone_surrogates(text):
    # tiktoken's rule: a surrogate pair becomes its character, a lone surrogate becomes U+FFFD
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _without_lone_surrogates(texts):
    """rustbpe raises on strings that can't be UTF-8 (lone surrogates, e.g. from JSON "\\ud800"); fix those."""
    for text in texts:
        if not text.isascii():  # O(1) in CPython, so pure-ASCII documents cost nothing here
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = _replace_lone_surrogates(text)
        yield text


def _get_messages(conversation):
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is {'messages': [...]} or a non-empty list of messages")
    return messages


def _merge_system_message(messages):
    """nanochat's rule: a leading system message is prepended to the first user message."""
    if messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    system, user = messages[0].get("content"), messages[1].get("content")
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("system and user message contents must be strings")
    merged_user = copy.copy(messages[1])  # don't mutate the caller's conversation
    merged_user["content"] = system + "\n\n" + user
    return [merged_user] + messages[2:]


def compute_token_bytes(tokenizer):
    """int32 tensor [vocab]: UTF-8 bytes each id stands for, 0 for special tokens.

    Measured on the raw token bytes. (nanochat at 5019accc decoded each id to a str first, which turns a token
    that is a partial UTF-8 sequence into U+FFFD and counts 3 bytes for it.)
    """
    enc = tokenizer.enc
    special_ids = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(tokenizer, tokenizer_dir):
    """Compute token_bytes and write `tokenizer_dir/token_bytes.pt` atomically; returns the tensor."""
    token_bytes = compute_token_bytes(tokenizer)
    os.makedirs(tokenizer_dir, exist_ok=True)
    path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILENAME)
    with atomic_open(path, "wb") as f:
        torch.save(token_bytes, f)
    print(f"Saved token_bytes to {path}")
    return token_bytes


def get_tokenizer():
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILENAME)
    if not os.path.exists(path):
        raise MissingFileError(f"No token bytes at {path}: they are written by `python -m scripts.tok_train`.")
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location=device)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                        f"the file is truncated or damaged. Copy it again with tokenizer.pkl from where the tokenizer "
                        f"was trained") from None
