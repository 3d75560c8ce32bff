"""
Our tiktoken tokenizer as Hugging Face tokenizer files, and back.

tokenizer.json is a byte-level BPE built with the `tokenizers` library (the format every HF tool reads) from the
tiktoken ranks: vocab id = tiktoken rank, one merge per way of splitting a token into two tokens, ordered by the
rank of the result (tiktoken merges the adjacent pair whose concatenation ranks lowest; the BPE model applies the
earliest merge, and with ignore_merges a piece that is a whole token is emitted directly, as tiktoken does).
Pretokenization is our split regex itself (Oniguruma reads its possessive quantifiers), then bytes -> GPT-2's
printable characters. The 9 special tokens keep their ids at the end.

One corner differs in principle: when two different splits of the same token sit next to each other in a piece
("ab"+"a" and "a"+"ba" both make "aba"), tiktoken merges the left one and BPE the one listed first. The tests
compare both encoders on varied text.

tokenizer(text) prepends <|bos|> (every training document starts with it); add_special_tokens=False gives
exactly our encode(text). The chat template renders a conversation like RustBPETokenizer.render_conversation and,
with add_generation_prompt=True, like render_for_completion; `{% generation %}` spans give our training mask
through return_assistant_tokens_mask.
"""

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from nanochat.tokenizer import SPECIAL_TOKENS, build_encoding

BOS = "<|bos|>"

# Jinja, rendered by transformers' apply_chat_template. Every block trims whitespace so the output is exactly the
# tokens' text. Order as in render_for_completion: a trailing assistant message is dropped first when asking for
# a generation prompt, then a leading system message is merged into the first user message.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}"
    "{%- set messages = messages[:-1] -%}"
    "{%- endif -%}"
    "{%- if not messages -%}{{- raise_exception('a conversation needs at least one user message') -}}{%- endif -%}"
    "{%- set system_prefix = '' -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user (after an optional system "
    "message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is not string -%}{{- raise_exception('user content must be a string') -}}{%- endif -%}"
    "{{- '<|user_start|>' + (system_prefix if loop.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{%- generation -%}{{- message['content'] -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- generation -%}{{- part['text'] -}}{%- endgeneration -%}"
    "{%- elif part['type'] == 'python' -%}"
    "{%- generation -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}{%- endgeneration -%}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown assistant part type ' + part['type'] + ' (expected text, python or "
    "python_output)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- generation -%}<|assistant_end|>{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def byte_to_unicode():
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codepoints)}


def mergeable_ranks(enc):
    """{token bytes: rank} of a tiktoken Encoding laid out like ours (the 9 special tokens last, in order)."""
    n_ranks = enc.n_vocab - len(SPECIAL_TOKENS)
    found = sorted(enc.special_tokens_set, key=enc.encode_single_token)
    if found != SPECIAL_TOKENS or [enc.encode_single_token(s) for s in found] != list(range(n_ranks, enc.n_vocab)):
        raise ValueError(f"Only nanochat tokenizers export (special tokens {SPECIAL_TOKENS} at the end of the "
                         f"vocab); this one has {found}")
    return {enc.decode_single_token_bytes(rank): rank for rank in range(n_ranks)}


def bpe_merges(ranks):
    """Every (left, right) pair of tokens that concatenates to a token, in the order tiktoken would merge them."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def hf_tokenizer(enc):
    """tokenizers.Tokenizer that encodes and decodes like the tiktoken Encoding `enc` (ours: tokenizer.enc)."""
    ranks = mergeable_ranks(enc)
    to_unicode = byte_to_unicode()
    as_text = lambda token: "".join(to_unicode[b] for b in token)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = [(as_text(left), as_text(right)) for left, right in bpe_merges(ranks)]
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # enc._pat_str: tiktoken has no public accessor for an Encoding's split pattern
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    ids = [tokenizer.token_to_id(s) for s in SPECIAL_TOKENS]
    assert ids == [enc.encode_single_token(s) for s in SPECIAL_TOKENS], "special token ids moved"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, enc.encode_single_token(BOS))])
    return tokenizer


def tokenizer_config(eos_token, model_max_length):
    """tokenizer_config.json: the fast tokenizer class, its special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": eos_token,
        "pad_token": BOS,  # no pad token of our own: nanochat pads with <|bos|> too (CORE batches, SFT rows)
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def encoding_from_tokenizer_json(path):
    """The tiktoken Encoding (our layout) that a byte-level BPE tokenizer.json stands for: vocab ids are the ranks,
    the split regex is the pre-tokenizer's, the added special tokens must be ours at the end."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a byte-level BPE tokenizer, got model type {model.get('type')!r}")
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): rank for token, rank in model["vocab"].items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocab entry with character {e} is not byte-level BPE") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: vocab ids are not 0..{len(ranks) - 1}")
    specials = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    if specials != [(len(ranks) + i, s) for i, s in enumerate(SPECIAL_TOKENS)]:
        raise ValueError(f"{path}: special tokens {specials} are not nanochat's {SPECIAL_TOKENS} after the vocab")
    return build_encoding(ranks, _split_pattern(data.get("pre_tokenizer"), path))


def _split_pattern(pre_tokenizer, path):
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    for step in steps:
        if step and step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    raise ValueError(f"{path}: no Split(Regex) pre-tokenizer: cannot tell how text is split before BPE")
