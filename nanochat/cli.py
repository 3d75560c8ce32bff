"""
What every script's command line shares, without importing torch (importing it takes seconds, so the trainers
check their flags with this module before they import anything heavy):

- `UserError`: a mistake the user can fix (a flag, a file, the disk; `MissingFileError` for a file not there).
  `exit_on_user_error(main)` runs an entry point and turns one into a single line on stderr and exit status 2
  (or the error's own `exit_code`), no traceback;
- `ArgumentParser`: argparse whose errors are that same one line (argparse's own print the whole usage first);
- argparse types that check ranges as the flag is parsed: `int_at_least`, `float_at_least`, `float_above`,
  `fraction`, `window_pattern`, `existing_file`, `existing_dir`, `push_url`;
- `add_push_arguments`: the trainers' --push-to / --push-wait (nanochat.hub).
"""

import argparse
import math
import os
import re
import sys


class UserError(ValueError):
    """Something the user can fix, with a message that says what went wrong and what to do. A ValueError, so code
    that already catches bad values keeps working."""
    exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
    """A file the user has to provide or create first (a tokenizer, a checkpoint). Also a FileNotFoundError."""


def one_line(text):
    """A message as one line (multi-line explanations are joined with ' | ')."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def exit_on_user_error(main):
    """Run `main()`; a UserError ends the process with one line on stderr ('ERROR: ...') and its exit code."""
    try:
        return main()
    except UserError as e:
        print(f"ERROR: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr (exit status 2): which flag, what is wrong,
    and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -----------------------------------------------------------------------------
# argparse types: each returns the parsed value or raises ArgumentTypeError, which argparse reports with the flag

def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum, off=None, multiple_of=1):
    """An integer >= minimum (and a multiple of `multiple_of`), or exactly `off` (the flag's 'disabled' or
    'automatic' value, e.g. -1)."""
    def parse(text):
        value = _number(text, int)
        if value == off:
            return value
        if value < minimum or value % multiple_of:
            want = f"an integer >= {minimum}" + (f" divisible by {multiple_of}" if multiple_of > 1 else "")
            raise argparse.ArgumentTypeError(f"must be {want}{f' (or {off})' if off is not None else ''}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _float_bounded(bound, off, strict):
    """A finite number >= bound (> bound when strict), or exactly `off`."""
    def parse(text):
        value = _number(text, float)
        if (value < bound or (strict and value == bound)) and value != off:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {bound:g}"
                                             f"{f' (or {off:g})' if off is not None else ''}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def float_at_least(minimum, off=None):
    """A finite number >= minimum, or exactly `off`."""
    return _float_bounded(minimum, off, strict=False)


def float_above(bound, off=None):
    """A finite number > bound, or exactly `off`."""
    return _float_bounded(bound, off, strict=True)


def fraction(text):
    """A number from 0 to 1."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def window_pattern(text):
    """Attention windows tiled over the layers: a non-empty string of S (short) and L (long)."""
    if not re.fullmatch(r"[SLsl]+", text):
        raise argparse.ArgumentTypeError(f"must be a string of S and L such as SSSL or L, got {text!r}")
    return text


def existing_file(text):
    """A path to a readable file (not a directory)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; pass a file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def existing_dir(text):
    """A path to a directory."""
    if not os.path.isdir(text):
        what = "a file" if os.path.exists(text) else "missing"
        raise argparse.ArgumentTypeError(f"{text} is {what}; pass a directory")
    return text


# -----------------------------------------------------------------------------
# Flags several scripts share, so they are spelled (and checked) one way

DEVICE_TYPES = ["", "cuda", "cpu", "mps"]


def add_device_argument(parser):
    parser.add_argument("--device-type", type=str, default="", choices=DEVICE_TYPES,
                        help="cuda|cpu|mps (empty = autodetect)")


def add_run_arguments(parser):
    """A trainer's --run (wandb) and --device-type."""
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    add_device_argument(parser)


def add_start_arguments(parser, default_source, what="which checkpoints to start from"):
    """A fine-tuning trainer's start and output (nanochat.training.resolve_start takes them): --source, --model-tag,
    --model-step, --output-tag, --resume-from-step."""
    parser.add_argument("--source", type=str, default=default_source,
                        help=f"{what}: base|mid|sft|rl|dpo, or a published model: an exported Hugging Face folder "
                             f"or a hub repo id (org/name)")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag to load from (default: largest d<N>)")
    parser.add_argument("--model-step", type=int_at_least(0), default=None,
                        help="model step to load from (default: last)")
    parser.add_argument("--output-tag", type=str, default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--resume-from-step", type=int_at_least(0, off=-1), default=-1,
                        help="resume this run from its checkpoint at this step (same flags, same world size)")


def add_lr_arguments(parser, embedding=None, unembedding=None, matrix=None, weight_decay=0.0):
    """The learning rates of a fine-tuning trainer's parameter groups and the Muon weight decay (an LR of None:
    inherit the source checkpoint's)."""
    def default(value):
        return " (default: inherit)" if value is None else ""
    parser.add_argument("--embedding-lr", type=float_at_least(0), default=embedding,
                        help=f"LR of the embeddings (AdamW){default(embedding)}")
    parser.add_argument("--unembedding-lr", type=float_at_least(0), default=unembedding,
                        help=f"LR of lm_head (AdamW){default(unembedding)}")
    parser.add_argument("--matrix-lr", type=float_at_least(0), default=matrix,
                        help=f"LR of the Muon matrices{default(matrix)}")
    parser.add_argument("--weight-decay", type=float_at_least(0), default=weight_decay,
                        help="weight decay of the Muon matrices")
