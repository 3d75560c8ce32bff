"""
Writing files so that a crash, a kill or a full disk never leaves a half-written one in place.

    with atomic_open(path, "w") as f:      # a temp file beside `path`
        f.write(...)                       # on a clean exit: flush, fsync, rename over `path`, fsync the dir
                                           # on any error: the temp file is removed and `path` is untouched

Files that must appear together (a checkpoint's weights, optimizer shards and meta) are written first with
`open_temp(path)` each, then put in place with `publish(path)` each, so the renames follow each other closely.

JSONL files (conversations, preference pairs, probes, search documents) are read through `iter_jsonl`, so a bad
line is always reported the same way: "path:LINE: reason".

Temp files are named `.<name>.tmp<pid>` in the destination's directory (a rename is only atomic within one
file system). A process killed mid-write leaves its temp file behind; `remove_stale_temp_files` clears those
of processes that no longer run. No torch here: the tokenizer and the data tools use it too.
"""

import json
import os
import re
from contextlib import contextmanager

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def temp_path_for(path):
    """The temp file an atomic write of `path` goes through (in the same directory)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp{os.getpid()}")


def fsync_dir(directory):
    """Make a rename inside `directory` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def open_temp(path, mode="wb", encoding=None):
    """Write `path`'s temp file (beside it), flushed and fsynced when the block ends; `publish(path)` then puts it
    in place. On an error inside the block the temp file is removed. For several files that must appear
    together (a checkpoint): write them all first, then publish them in a quick succession."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic writes write whole files: mode must be 'w' or 'wb', got {mode!r}")
    tmp_path = temp_path_for(path)
    os.makedirs(os.path.dirname(tmp_path), exist_ok=True)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp_path, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard_temp(path)
        raise


def publish(path):
    """Rename the temp file that open_temp wrote over `path` (atomic), and make the rename durable."""
    tmp_path = temp_path_for(path)
    try:
        os.replace(tmp_path, path)
    except BaseException:
        discard_temp(path)
        raise
    fsync_dir(os.path.dirname(tmp_path))


def discard_temp(path):
    """Remove `path`'s temp file if this process left one."""
    try:
        os.remove(temp_path_for(path))
    except OSError:
        pass


@contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """Open a temp file for writing; on success it replaces `path` in one rename. mode: "w" or "wb"."""
    with open_temp(path, mode, encoding) as f:
        yield f
    publish(path)


def atomic_write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(directory):
    """Delete the temp files of atomic writes in `directory` whose writer process is gone (killed mid-save).
    Returns the removed paths. Temp files of live processes (a concurrent writer) are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_RE.match(name)
        if match is None or _pid_alive(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


# -----------------------------------------------------------------------------
# JSONL

def parse_jsonl_line(raw):
    """One JSONL line (bytes) -> (value, None), or (None, problem) when it is not UTF-8 or not JSON.
    Blank lines give (None, None): callers skip them."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    if not line.strip():
        return None, None
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"


def iter_jsonl(path):
    """(line number, value, problem) for every non-blank line of a JSONL file, streamed: problem is None for a good
    line, else the reason (value None). Split on \\n only (str.splitlines would also break on U+2028)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            value, problem = parse_jsonl_line(raw)
            if value is not None or problem is not None:
                yield line_number, value, problem


def load_jsonl(path, parse_row):
    """(rows, errors) of a JSONL file: rows are parse_row(value) of every good line; errors are "path:LINE:
    reason" for each line that is not JSON, or whose parse_row raised ValueError (the reason is its message)."""
    rows, errors = [], []
    for line_number, value, problem in iter_jsonl(path):
        try:
            if problem is not None:
                raise ValueError(problem)
            rows.append(parse_row(value))
        except ValueError as e:
            errors.append(f"{path}:{line_number}: {e}")
    return rows, errors
