"""
Train nanochat's BPE tokenizer (rustbpe) on the pretraining text and save it to $NANOCHAT_BASE_DIR/tokenizer/:
tokenizer.pkl (pickled tiktoken Encoding, nanochat's format) and token_bytes.pt (bytes per token id, for bpb).

    python -m scripts.tok_train --max-chars 2000000000 --doc-cap 10000 --vocab-size 32768
    python -m scripts.tok_train --data-dir /path/to/my/text --vocab-size 8192   # any folder of parquet/jsonl/txt

An existing tokenizer is only replaced with --force: every checkpoint trained with it stops loading (their
tokenizer fingerprint no longer matches).
"""

import itertools
import os
import time

from nanochat.cli import ArgumentParser, UserError, existing_dir, exit_on_user_error, int_at_least


def build_parser():
    parser = ArgumentParser(description="Train the BPE tokenizer and save it to $NANOCHAT_BASE_DIR/tokenizer/.")
    parser.add_argument("--max-chars", type=int_at_least(1), default=2_000_000_000,
                        help="stop after this many characters of training text (default: 2B, ~8 ClimbMix shards)")
    parser.add_argument("--doc-cap", type=int_at_least(1), default=10_000,
                        help="crop every document to this many characters, so long documents don't dominate (default: 10000)")
    parser.add_argument("--vocab-size", type=int_at_least(1), default=32768,
                        help="vocabulary size including the 9 special tokens, at least 256 + 9 (default: 32768 = 2^15)")
    parser.add_argument("--data-dir", type=existing_dir, default=None,
                        help="folder of parquet (text column) / jsonl / txt files to train on "
                             "(default: the pretraining shards in $NANOCHAT_BASE_DIR)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing tokenizer (checkpoints trained with it will no longer load)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # a bad flag ends here, in a fraction of a second: the imports below take seconds

# Below the flag check on purpose (start-up time, see above).
from nanochat.common import get_base_dir
from nanochat.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILENAME, RustBPETokenizer, save_token_bytes
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report

# numbers, contractions, symbols, whitespace, CJK, Korean, emoji, code: each exercises a different regex branch
ROUND_TRIP_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89, 3.14159, 1e-9
Contractions: I'm, you're, it's, we'll, they've, she'd, DON'T
Special chars: @#$%^&*() <|bos|> <think>
Unicode: 你好世界 こんにちは 안녕하세요 Ωμέγα naïve café 🌍🚀👨‍👩‍👧
Code:\tdef f(x):\r\n    return x**2  # done
"""


def text_iterator(batches, max_chars, doc_cap, log_every_s=5.0):
    """Flatten batches of documents, crop each to doc_cap chars, stop once more than max_chars were yielded.

    Logs progress every few seconds (rustbpe pulls documents as it ingests them), and a final line when the
    text is exhausted, after which rustbpe computes the merges.
    """
    stats = {"chars": 0, "docs": 0}
    t0 = last_log = time.time()

    def log(prefix):
        elapsed = max(time.time() - t0, 1e-9)
        print(f"{prefix} {stats['docs']:,} docs, {stats['chars']:,} chars "
              f"({stats['chars'] / elapsed / 1e6:.1f}M chars/s)", flush=True)

    def generate():
        nonlocal last_log
        for batch in batches:
            for doc in batch:
                doc = doc[:doc_cap]
                stats["chars"] += len(doc)
                stats["docs"] += 1
                yield doc
                if stats["chars"] > max_chars:
                    log("Reached --max-chars after")
                    print("Computing merges...", flush=True)
                    return
                now = time.time()
                if now - last_log >= log_every_s:
                    last_log = now
                    log("Read")
        log("Read all the text:")
        print("Computing merges...", flush=True)

    return generate(), stats


def train_and_save(batches, vocab_size, max_chars, doc_cap, tokenizer_dir):
    """Train on the batches, check a round trip, save tokenizer.pkl + token_bytes.pt. Returns a dict of results."""
    batches = iter(batches)
    first = next(batches, None)
    if not first:
        raise UserError("No training text found. Get data first (`python -m nanochat.dataset -n 8`, or "
                         "`python -m nanochat.dataset --offline` without internet), or pass --data-dir DIR.")
    docs, stats = text_iterator(itertools.chain([first], batches), max_chars, doc_cap)
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(docs, vocab_size)
    train_time = time.time() - t0
    chars_per_s = stats["chars"] / max(train_time, 1e-9)
    print(f"Training time: {train_time:.2f}s ({stats['chars']:,} chars, {chars_per_s / 1e6:.2f}M chars/s)")

    decoded = tokenizer.decode(tokenizer.encode(ROUND_TRIP_TEXT))
    if decoded != ROUND_TRIP_TEXT:
        raise RuntimeError(f"Tokenizer round trip failed:\n{ROUND_TRIP_TEXT!r}\n!=\n{decoded!r}")

    tokenizer.save(tokenizer_dir)
    token_bytes = save_token_bytes(tokenizer, tokenizer_dir)
    nonzero = token_bytes[token_bytes > 0].float()
    return {
        "tokenizer": tokenizer,
        "train_time": train_time,
        "train_chars": stats["chars"],
        "train_docs": stats["docs"],
        "chars_per_s": chars_per_s,
        "vocab_size": tokenizer.get_vocab_size(),
        "num_special_tokens": len(tokenizer.get_special_tokens()),
        "token_bytes_min": int(nonzero.min()),
        "token_bytes_max": int(nonzero.max()),
        "token_bytes_mean": nonzero.mean().item(),
        "token_bytes_std": nonzero.std().item(),
    }


def log_report(args, results):
    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {k: v for k, v in results.items() if k != "tokenizer"},
    ])


def main(argv=None, batches=None):
    args = build_parser().parse_args(argv)
    for name, value in vars(args).items():
        print(f"{name}: {value:,}" if type(value) is int else f"{name}: {value}")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        raise UserError(f"--vocab-size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} special "
                        f"tokens), got {args.vocab_size}")
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    existing = os.path.join(tokenizer_dir, TOKENIZER_FILENAME)
    if os.path.exists(existing) and not args.force:
        raise UserError(f"{existing} already exists, and checkpoints trained with it stop loading once it is "
                        f"replaced. Pass --force to replace it, or set NANOCHAT_BASE_DIR to another directory")

    if batches is None:  # tests inject batches; normally we read the train split
        batches = parquets_iter_batched("train", data_dir=args.data_dir)
    results = train_and_save(batches, args.vocab_size, args.max_chars, args.doc_cap, tokenizer_dir)
    log_report(args, results)
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
