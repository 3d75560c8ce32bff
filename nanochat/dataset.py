"""
The pretraining text: where it lives, how it is split into train/val, how it is read and downloaded.

Sources, in the order `data_dir=None` looks for them:
1. ClimbMix shards (`karpathy/climbmix-400b-shuffle`, `shard_00000.parquet` ... `shard_06542.parquet`) in
   `$NANOCHAT_BASE_DIR/base_data_climbmix/`, fetched by `python -m nanochat.dataset -n N` (the last shard,
   06542, is the validation shard and is always fetched too);
2. the offline corpus in `$NANOCHAT_BASE_DIR/base_data_offline/`, built by `python -m nanochat.dataset --offline`
   from the running Python installation (see nanochat/offline_corpus.py);
3. legacy nanochat FineWeb-EDU shards in `$NANOCHAT_BASE_DIR/base_data/` (with a warning).

Or any local folder (`--data-dir DIR` in the scripts) holding, in any mix, searched recursively:
- `*.parquet` with a `text` column (each parquet row group is a unit of reading),
- `*.jsonl` with an object per line that has a string `text` field (a unit = 1024 consecutive documents),
- `*.txt`: a text file is cut into documents at blank lines, and consecutive paragraphs are merged while the
  document stays under 4000 characters (a paragraph alone over that is cut between lines). Why not one document
  per file: the BOS-aligned packer crops a document longer than a row, so a whole book would contribute only
  its first T tokens; why not one document per paragraph: short documents lose their context.

Split rule (nanochat's): files sorted by path; the last file is val, all others are train. A folder with a
single file is split inside it instead: its last unit (row group / 1024 documents) is val, the rest train.
"""

import os
import sys
import argparse
import importlib
from functools import lru_cache
from multiprocessing import Pool

import pyarrow.parquet as pq
import requests
from tqdm import tqdm

from nanochat.common import get_base_dir, is_rank0
from nanochat.download import download_file, hf_dataset_url, hf_endpoint, DownloadError
from nanochat.fileio import parse_jsonl_line
from nanochat.offline_corpus import build_offline_corpus, split_text

# -----------------------------------------------------------------------------
# The hosted pretraining dataset

REPO_ID = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542  # the last shard, shard_06542.parquet, is the validation shard
DATA_DIR_NAME = "base_data_climbmix"
OFFLINE_DIR_NAME = "base_data_offline"
LEGACY_DIR_NAME = "base_data"  # nanochat's earlier FineWeb-EDU-100B shards
DATA_EXTENSIONS = (".parquet", ".jsonl", ".txt")
JSONL_DOCS_PER_UNIT = 1024
TXT_DOC_CHARS = 4000
NO_NETWORK_HINT = ("or train on local files with --data-dir DIR, "
                   "or build an offline corpus with `python -m nanochat.dataset --offline`")


def index_to_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir():
    return os.path.join(get_base_dir(), DATA_DIR_NAME)


_notes_printed = set()


def _note_once(message):
    if message not in _notes_printed and is_rank0():
        _notes_printed.add(message)
        print(message, flush=True)


def _files_in(data_dir, extensions=DATA_EXTENSIONS):
    found = []
    for dirpath, dirnames, filenames in os.walk(data_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.endswith(extensions) and not filename.startswith("."):
                found.append(os.path.join(dirpath, filename))
    # sort by path relative to the folder, so "the last file" does not depend on where the folder is
    return sorted(found, key=lambda p: os.path.relpath(p, data_dir).replace(os.sep, "/"))


def resolve_data_dir(data_dir=None, warn_on_legacy=True):
    """An explicit data_dir as given; otherwise the first of ClimbMix / offline corpus / legacy dir that has data."""
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"--data-dir {data_dir} does not exist (or is not a directory)")
        return data_dir
    base = get_base_dir()
    climbmix = os.path.join(base, DATA_DIR_NAME)
    if os.path.isdir(climbmix) and _files_in(climbmix, (".parquet",)):
        return climbmix
    offline = os.path.join(base, OFFLINE_DIR_NAME)
    if os.path.isdir(offline) and _files_in(offline, (".parquet",)):
        _note_once(f"Note: no ClimbMix shards in {climbmix}; using the offline corpus in {offline}")
        return offline
    legacy = os.path.join(base, LEGACY_DIR_NAME)
    if os.path.isdir(legacy) and _files_in(legacy, (".parquet",)):
        if warn_on_legacy:
            _note_once("=" * 80 + f"\nWARNING: using legacy FineWeb-EDU shards in {legacy}. nanochat now trains on "
                       f"ClimbMix: re-download with `python -m nanochat.dataset -n 8` and retrain the tokenizer.\n"
                       + "=" * 80)
        return legacy
    raise FileNotFoundError(
        f"No pretraining data in {base}. Download ClimbMix shards with `python -m nanochat.dataset -n 8`, "
        f"build the offline corpus with `python -m nanochat.dataset --offline`, or pass --data-dir DIR "
        f"(a folder of parquet/jsonl/txt files).")


def list_parquet_files(data_dir=None, warn_on_legacy=True):
    """Full paths of the parquet files of the (resolved) data dir, sorted."""
    return _files_in(resolve_data_dir(data_dir, warn_on_legacy), (".parquet",))


def list_data_files(data_dir=None, warn_on_legacy=True):
    """Full paths of all data files (parquet, jsonl, txt) of the (resolved) data dir, sorted."""
    return _files_in(resolve_data_dir(data_dir, warn_on_legacy))


# -----------------------------------------------------------------------------
# Reading: every file is a sequence of units ("row groups") that are lists of documents.

@lru_cache(maxsize=4)
def _parquet_file(path, mtime):
    return pq.ParquetFile(path)


@lru_cache(maxsize=16)
def _jsonl_unit_offsets(path, mtime):
    """Byte offset and line number where each unit of JSONL_DOCS_PER_UNIT non-blank lines starts."""
    offsets, docs, offset = [], 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                if docs % JSONL_DOCS_PER_UNIT == 0:
                    offsets.append((offset, lineno))
                docs += 1
            offset += len(line)
    return tuple(offsets)


@lru_cache(maxsize=2)
def _txt_documents(path, mtime):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    docs = [d.strip() for d in split_text(text, TXT_DOC_CHARS)]
    return tuple(d for d in docs if d)


def _mtime(path):
    return os.stat(path).st_mtime_ns


def num_row_groups(path):
    """How many units (parquet row groups / batches of documents) a data file has."""
    if path.endswith(".parquet"):
        return _parquet_file(path, _mtime(path)).num_row_groups
    if path.endswith(".jsonl"):
        return len(_jsonl_unit_offsets(path, _mtime(path)))
    docs = _txt_documents(path, _mtime(path))
    return (len(docs) + JSONL_DOCS_PER_UNIT - 1) // JSONL_DOCS_PER_UNIT


def read_row_group(path, rg_idx):
    """The documents (list of str) of unit rg_idx of a data file."""
    if path.endswith(".parquet"):
        pf = _parquet_file(path, _mtime(path))
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    if path.endswith(".jsonl"):
        offset, lineno = _jsonl_unit_offsets(path, _mtime(path))[rg_idx]
        docs = []
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                if len(docs) == JSONL_DOCS_PER_UNIT:
                    break
                if line.strip():
                    row, problem = parse_jsonl_line(line)
                    if problem is not None:
                        raise ValueError(f"{path}:{lineno}: {problem}")
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
                    docs.append(row["text"])
                lineno += 1
        return docs
    docs = _txt_documents(path, _mtime(path))
    return list(docs[rg_idx * JSONL_DOCS_PER_UNIT:(rg_idx + 1) * JSONL_DOCS_PER_UNIT])


def split_parts(split, data_dir=None, warn_on_legacy=True):
    """The files of a split as a list of (path, unit_indices): unit_indices is a range over the file's units.
    Last file = val, the others = train; a lone file gives its last unit to val and the rest to train."""
    assert split in ("train", "val"), "split must be 'train' or 'val'"
    resolved = resolve_data_dir(data_dir, warn_on_legacy=warn_on_legacy)
    paths = _files_in(resolved)
    if not paths:
        raise FileNotFoundError(f"No .parquet/.jsonl/.txt files in {resolved}")
    if len(paths) == 1:
        n = num_row_groups(paths[0])
        if n < 2:
            raise ValueError(f"{paths[0]} is the only data file in {resolved} and has a single unit of documents, "
                             f"so nothing is left for train once val takes the last one. Add a second file (the last "
                             f"one by name is val) or more documents.")
        _note_once(f"Note: {paths[0]} is the only data file: its last of {n} units is val, the rest train")
        return [(paths[0], range(n - 1))] if split == "train" else [(paths[0], range(n - 1, n))]
    selected = paths[:-1] if split == "train" else paths[-1:]
    return [(p, range(num_row_groups(p))) for p in selected]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the documents of a split one unit (parquet row group) at a time, taking units start, start+step, ...
    of every file (start=rank, step=world_size gives each DDP rank a disjoint share)."""
    for path, units in split_parts(split, data_dir):
        for i in range(start, len(units), step):
            yield read_row_group(path, units[i])


# -----------------------------------------------------------------------------
# Downloading ClimbMix

def _verify_parquet(path):
    pf = pq.ParquetFile(path)  # raises on a truncated/corrupt footer
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"no 'text' column in {os.path.basename(path)}")


def download_shard(index, data_dir=None, retries=5, progress=False):
    """Fetch one ClimbMix shard (skipped if present). Returns True on success; prints why on failure."""
    data_dir = data_dir or get_data_dir()
    filename = index_to_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        return True
    try:
        download_file(hf_dataset_url(REPO_ID, filename), path, desc=filename, retries=retries, verify=_verify_parquet,
                      progress=progress, hint=NO_NETWORK_HINT)
    except DownloadError as e:
        print(f"Failed to download {filename}: {e}", flush=True)
        return False
    return True


def _download_shard_job(args):
    return args[0], download_shard(*args)


def check_endpoint_reachable(timeout=10):
    """Fail fast (instead of after every shard's retries) when the hub cannot be reached at all."""
    endpoint = hf_endpoint()
    try:
        requests.head(endpoint, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise DownloadError(f"could not reach {endpoint} ({e}). Check your connection, or set HF_ENDPOINT to a "
                            f"reachable mirror, {NO_NETWORK_HINT}.") from None


def download_shards(num_files=-1, num_workers=4, data_dir=None):
    """Download the first num_files shards (-1 = all) plus the validation shard. Returns the failed indices."""
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    num = MAX_SHARD + 1 if num_files == -1 else min(num_files, MAX_SHARD + 1)
    indices = list(range(num))
    if MAX_SHARD not in indices:
        indices.append(MAX_SHARD)  # the validation shard
    todo = [i for i in indices if not os.path.exists(os.path.join(data_dir, index_to_filename(i)))]
    print(f"Downloading {len(todo)} shards ({len(indices) - len(todo)} already present) "
          f"from {hf_dataset_url(REPO_ID, '')} using {num_workers} workers")
    print(f"Target directory: {data_dir}")
    failed = []
    if todo:
        check_endpoint_reachable()
        # refer to the job through the importable module, not __main__ (which differs under `python -m`, runpy, spawn)
        job = importlib.import_module("nanochat.dataset")._download_shard_job
        with Pool(processes=max(1, min(num_workers, len(todo)))) as pool:
            jobs = pool.imap_unordered(job, [(i, data_dir) for i in todo])
            for index, ok in tqdm(jobs, total=len(todo), desc="shards", unit="shard"):
                if not ok:
                    failed.append(index)
    print(f"Done! Downloaded: {len(indices) - len(failed)}/{len(indices)} shards to {data_dir}")
    return sorted(failed)


# -----------------------------------------------------------------------------
# Checking a local folder

def summarize_data_dir(data_dir):
    """Read every document of a folder (so bad rows surface now, not mid-training) and print what is there."""
    paths = _files_in(resolve_data_dir(data_dir))
    if not paths:
        raise FileNotFoundError(f"No .parquet/.jsonl/.txt files in {data_dir}")
    totals = {}
    for split in ("train", "val"):
        docs = chars = 0
        for path, units in split_parts(split, data_dir):
            for u in units:
                texts = read_row_group(path, u)
                docs += len(texts)
                chars += sum(len(t) for t in texts)
        totals[split] = (docs, chars)
    print(f"{data_dir}: {len(paths)} files ({', '.join(os.path.relpath(p, data_dir) for p in paths[:5])}"
          f"{', ...' if len(paths) > 5 else ''})")
    for split, (docs, chars) in totals.items():
        print(f"  {split}: {docs:,} documents, {chars:,} characters")
    return totals


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Get pretraining text: download ClimbMix shards, build the offline "
                                                 "corpus, or check a local folder of documents.")
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help="number of ClimbMix train shards to download, -1 = all 6542 (default when no other "
                             "action is given); the validation shard is always fetched too")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel download processes (default: 4)")
    parser.add_argument("--data-dir", type=str, default=None,
                        help="the data folder: where -n downloads to / where --offline writes; given alone, check "
                             "and summarize a local folder of parquet (text column) / jsonl (text field) / txt files")
    parser.add_argument("--offline", action="store_true",
                        help="build the offline corpus from this Python installation (stdlib docs and sources) "
                             "into $NANOCHAT_BASE_DIR/base_data_offline (no network needed)")
    parser.add_argument("--force", action="store_true", help="with --offline: rebuild even if the corpus exists")
    args = parser.parse_args()
    try:
        if args.offline:
            build_offline_corpus(out_dir=args.data_dir, force=args.force)
        elif args.data_dir is not None and args.num_files is None:
            summarize_data_dir(args.data_dir)
        else:
            failed = download_shards(-1 if args.num_files is None else args.num_files, args.num_workers, args.data_dir)
            if failed:
                print(f"{len(failed)} shards failed ({', '.join(map(str, failed[:10]))}{' ...' if len(failed) > 10 else ''}); "
                      f"run the same command again to retry them.", file=sys.stderr)
                sys.exit(1)
    except (DownloadError, FileNotFoundError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
