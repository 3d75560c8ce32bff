import os
import subprocess
import sys

import pytest

from nanochat.fileio import atomic_open, atomic_write_text, iter_jsonl, remove_stale_temp_files, temp_path_for


def test_atomic_open_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "old")
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["a.txt"]  # no temp file left


def test_error_mid_write_keeps_old_file_and_removes_temp(tmp_path):
    tmp_path = tmp_path / "out"
    path = tmp_path / "a.bin"
    with atomic_open(path, "wb") as f:
        f.write(b"good")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_rejects_append_mode(tmp_path):
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    tmp_path = tmp_path / "ckpt"
    tmp_path.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model_000010.pt.tmp{dead_pid}"
    stale.write_bytes(b"x" * 10)
    live = tmp_path / os.path.basename(temp_path_for(tmp_path / "meta.json"))  # ours: the writer is alive
    live.write_bytes(b"y")
    keep = tmp_path / "model_000010.pt"
    keep.write_bytes(b"z")
    removed = remove_stale_temp_files(tmp_path)
    assert removed == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, keep.name])


def test_iter_jsonl_skips_blank_lines_and_names_bad_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"b": \n[1, "x\xe2\x80\xa8y"]\n\xff\xfe\n')  # U+2028 inside a string is data
    rows = list(iter_jsonl(path))
    assert [(n, v) for n, v, p in rows if p is None] == [(1, {"a": 1}), (5, [1, "x\u2028y"])]
    bad = {n: p for n, v, p in rows if p is not None}
    assert set(bad) == {4, 6} and bad[4].startswith("invalid JSON") and bad[6].startswith("not valid UTF-8")
