"""nanochat.dataset (shard download, data folders, train/val split) and nanochat.offline_corpus."""
import os
import sys
import json
import runpy
import warnings
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import parquets_iter_batched, list_parquet_files, split_parts
from nanochat.offline_corpus import (build_offline_corpus, split_source, split_text, api_doc_entries, DOC_CHARS,
                                     VAL_ROW_GROUP_DOCS)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_parquet(path, texts, row_group_size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def run_cli(monkeypatch, capsys, *argv):
    """`python -m nanochat.dataset ARGV` in this process (cheap); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nanochat.dataset", *argv])
    code = 0
    try:
        with warnings.catch_warnings():  # runpy warns that nanochat.dataset is already imported: intended here
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module("nanochat.dataset", run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -----------------------------------------------------------------------------
# Downloading ClimbMix shards

def test_cli_downloads_n_shards_plus_val_through_hf_endpoint(tmp_path, _isolated_base_dir, file_server):
    prefix = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
    files = {}
    for index in (0, 1, 6542):
        local = tmp_path / f"src{index}.parquet"
        write_parquet(str(local), [f"doc {index}-{i} " * 50 for i in range(300)], row_group_size=100)
        files[prefix + dataset.index_to_filename(index)] = local.read_bytes()
    server = file_server(files, faults={prefix + "shard_00001.parquet": [500],
                                        prefix + "shard_06542.parquet": ["truncate"]})
    env = {**os.environ, "HF_ENDPOINT": server.url, "NANOCHAT_DOWNLOAD_BACKOFF": "0.001",
           "NANOCHAT_BASE_DIR": str(_isolated_base_dir)}
    try:
        result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "-w", "2"], env=env,
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert "Downloaded: 3/3" in result.stdout
    data_dir = _isolated_base_dir / "base_data_climbmix"
    assert sorted(f for f in os.listdir(data_dir) if not f.endswith(".lock")) == \
        ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for path, content in files.items():
        assert (data_dir / path.rsplit("/", 1)[1]).read_bytes() == content
    # split rule: the last file (the always-fetched shard 06542) is val, the others train
    assert [os.path.basename(p) for p in list_parquet_files()] == \
        ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert [os.path.basename(p) for p, _ in split_parts("train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [os.path.basename(p) for p, _ in split_parts("val")] == ["shard_06542.parquet"]
    val_docs = [d for batch in parquets_iter_batched("val") for d in batch]
    assert val_docs == [f"doc 6542-{i} " * 50 for i in range(300)]


def test_cli_without_network_fails_fast_with_a_clear_message(monkeypatch, capsys):
    # conftest points HF_ENDPOINT at a closed port
    code, out, err = run_cli(monkeypatch, capsys, "-n", "1")
    assert code == 1
    assert "could not reach http://127.0.0.1:9" in err and "HF_ENDPOINT" in err and "--data-dir" in err


# -----------------------------------------------------------------------------
# Local folders: parquet / jsonl / txt

def test_data_dir_with_parquet_jsonl_and_txt(tmp_path, monkeypatch, capsys):
    data = tmp_path / "mine"
    write_parquet(str(data / "a.parquet"), [f"a{i}" for i in range(5)], row_group_size=2)
    os.makedirs(data / "b")
    (data / "b" / "notes.jsonl").write_text("\n".join(json.dumps({"text": f"b{i}", "id": i}) for i in range(3)) + "\n\n")
    paragraphs = ["x" * 1500, "y" * 1500, "z" * 1500, "w" * 1500]
    (data / "c.txt").write_text("\n\n".join(paragraphs) + "\n")
    (data / "ignored.csv").write_text("not data")

    train = list(parquets_iter_batched("train", data_dir=str(data)))
    assert train == [["a0", "a1"], ["a2", "a3"], ["a4"], ["b0", "b1", "b2"]]
    # txt: documents are cut at blank lines, consecutive paragraphs merged while under 4000 characters
    val = list(parquets_iter_batched("val", data_dir=str(data)))
    assert val == [[paragraphs[0] + "\n\n" + paragraphs[1], paragraphs[2] + "\n\n" + paragraphs[3]]]

    code, out, _ = run_cli(monkeypatch, capsys, "--data-dir", str(data))
    assert code == 0 and "train: 8 documents" in out and "val: 2 documents" in out


def test_txt_paragraph_longer_than_a_document_is_cut_between_lines():
    text = "".join(f"line {i} " + "q" * 90 + "\n" for i in range(100))  # ~10k chars, no blank line
    docs = split_text(text, 4000)
    assert len(docs) == 3 and all(len(d) <= 4000 for d in docs) and "".join(docs) == text


def test_bad_jsonl_row_is_reported_with_file_and_line(tmp_path):
    data = tmp_path / "d"
    os.makedirs(data)
    (data / "0.jsonl").write_text('{"text": "ok"}\n\n{"txt": "no text field"}\n')
    (data / "1.jsonl").write_text('{"text": "val"}\n')
    with pytest.raises(ValueError, match=r"0\.jsonl:3: expected an object with a string \"text\" field"):
        list(parquets_iter_batched("train", data_dir=str(data)))
    (data / "0.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"0\.jsonl:2: invalid JSON"):
        list(parquets_iter_batched("train", data_dir=str(data)))
    (data / "0.jsonl").write_text('{"text": "ok"}\n')
    (data / "0.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"0\.txt: not UTF-8"):
        list(parquets_iter_batched("train", data_dir=str(data)))


def test_a_single_file_gives_its_last_unit_to_val(tmp_path):
    data = tmp_path / "one"
    os.makedirs(data)
    (data / "all.jsonl").write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(2500)))
    train = [d for batch in parquets_iter_batched("train", data_dir=str(data)) for d in batch]
    val = [d for batch in parquets_iter_batched("val", data_dir=str(data)) for d in batch]
    assert train == [f"d{i}" for i in range(2048)] and val == [f"d{i}" for i in range(2048, 2500)]
    (data / "all.jsonl").write_text('{"text": "lonely"}\n')
    with pytest.raises(ValueError, match="only data file"):
        split_parts("train", data_dir=str(data))


def test_row_groups_are_strided_across_ranks(tmp_path):
    data = tmp_path / "p"
    for f in range(3):
        write_parquet(str(data / f"{f}.parquet"), [f"{f}-{i}" for i in range(7 + f)], row_group_size=2)
    everything = [d for batch in parquets_iter_batched("train", data_dir=str(data)) for d in batch]
    per_rank = [[d for batch in parquets_iter_batched("train", start=r, step=2, data_dir=str(data)) for d in batch]
                for r in range(2)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert per_rank[1][:2] == ["0-2", "0-3"]  # rank 1 starts at the second row group of each file


def test_default_data_dir_prefers_climbmix_then_offline(_isolated_base_dir, capsys):
    with pytest.raises(FileNotFoundError, match="--offline"):
        list_parquet_files()
    offline = _isolated_base_dir / "base_data_offline"
    write_parquet(str(offline / "shard_00000.parquet"), ["o1"], 1)
    write_parquet(str(offline / "shard_00001.parquet"), ["o2"], 1)
    assert [os.path.basename(os.path.dirname(p)) for p in list_parquet_files()] == ["base_data_offline"] * 2
    assert "using the offline corpus" in capsys.readouterr().out
    write_parquet(str(_isolated_base_dir / "base_data_climbmix" / "shard_00000.parquet"), ["c"], 1)
    write_parquet(str(_isolated_base_dir / "base_data_climbmix" / "shard_06542.parquet"), ["v"], 1)
    assert list(parquets_iter_batched("val")) == [["v"]]


# -----------------------------------------------------------------------------
# Offline corpus

SAMPLE_MODULE = '''"""A sample module."""
import os
raise SystemExit("importing this module would exit")

# a comment that belongs to the next function
def first(a, b=1):
    """Add things."""
    return a + b


class Thing(Base):
    """A thing."""
    def __init__(self, x):
        """Make one."""
        self.x = x

    def _hidden(self):
        """not documented publicly"""

''' + "".join(f"\n\ndef f{i}(x):\n    \"\"\"Doc {i}.\"\"\"\n" + "    y = x\n" * 60 for i in range(20))


def test_source_chunks_are_lossless_bounded_and_cut_at_definitions():
    chunks = split_source(SAMPLE_MODULE, max_chars=1500)
    assert "".join(chunks) == SAMPLE_MODULE
    assert all(len(c) <= 1500 for c in chunks) and len(chunks) > 5
    assert all(c.lstrip("\n").startswith(("def ", "class ", "# a comment", '"""')) for c in chunks)


def test_api_docs_come_from_the_source_without_importing_it():
    import ast
    entries = api_doc_entries("sample", ast.parse(SAMPLE_MODULE))
    assert entries[:4] == ["A sample module.", "def sample.first(a, b=1)\n    Add things.",
                           "class sample.Thing(Base):\n    A thing.", "def sample.Thing.__init__(self, x)\n    Make one."]
    assert not any("_hidden" in e for e in entries)


def test_offline_corpus_is_deterministic_and_shaped_like_climbmix(tmp_path, _isolated_base_dir):
    out = str(_isolated_base_dir / "base_data_offline")
    paths = build_offline_corpus(sources=("topics",), verbose=False)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    first = [pq.read_table(p).column("text").to_pylist() for p in paths]
    texts = first[0] + first[1]
    assert len(set(texts)) == len(texts) and all(len(t) <= DOC_CHARS + 100 for t in texts)
    assert sum(len(t) for t in texts) > 100_000
    assert len(first[1]) == len(texts) // 10  # val: the last shard
    assert all(pq.ParquetFile(paths[1]).metadata.row_group(i).num_rows <= VAL_ROW_GROUP_DOCS
               for i in range(pq.ParquetFile(paths[1]).num_row_groups))
    # rebuilding gives the same shards in the same order; without --force the existing corpus is kept
    again = build_offline_corpus(out_dir=str(tmp_path / "again"), sources=("topics",), verbose=False)
    assert [pq.read_table(p).column("text").to_pylist() for p in again] == first
    assert build_offline_corpus(verbose=False) == paths
    assert not os.path.exists(out + ".tmp")
    # and it is what the loaders read by default when there are no ClimbMix shards
    assert [d for b in parquets_iter_batched("val") for d in b] == first[1]
