"""
Task data from the Hugging Face hub, without the `datasets` library, or from a local file/folder.

The hub converts every public dataset to parquet ("parquet export", branch refs/convert/parquet). We list
a split's files with `{HF_ENDPOINT}/api/datasets/{repo}/parquet/{config}/{split}`, download them once with
nanochat.download.download_file (retries, file lock, atomic rename) and keep them under

    $NANOCHAT_BASE_DIR/task_data/<owner>--<name>/<config>/<split>/00000.parquet ... + manifest.json

so later runs (and other ranks) read the cache and never touch the network.

A local copy can stand in for any task (checked before the hub, in this order):
    1. the task's `data_path=` argument
    2. env NANOCHAT_TASK_DATA_<NAME>   (e.g. NANOCHAT_TASK_DATA_GSM8K=/data/gsm8k/train.jsonl)
    3. env NANOCHAT_TASK_DATA          (a folder holding one sub-folder per task: gsm8k/, mmlu/, arc/, ...)
Each may be a parquet / jsonl / json file (used as is), or a folder in one of the usual layouts:
    <config>/<split>/*.parquet        (this cache, the parquet export)
    <config>/<split>-*.parquet        (the hub repos' own files, e.g. all/test-00000-of-00001.parquet)
    <config>-<split>.jsonl            (e.g. ARC-Easy-validation.jsonl)
    <split>.jsonl, data/<split>-*.parquet  (for the task's default config, e.g. gsm8k/train.jsonl)
plus task-specific names (HumanEval.jsonl). Rows are shuffled like `datasets.Dataset.shuffle(seed=42)`
(a numpy default_rng(42) permutation), so the examples come in the reference's order.
"""

import os
import gzip
import json
import glob
import bisect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from filelock import FileLock

from nanochat.common import get_base_dir
from nanochat.fileio import atomic_write_text, parse_jsonl_line
from nanochat.download import DEFAULT_HF_ENDPOINT, download_file, hf_endpoint

DATA_EXTENSIONS = ("parquet", "jsonl", "json")


class TaskDataUnavailable(RuntimeError):
    """Neither a local copy nor the hub could provide a task's data."""


# -----------------------------------------------------------------------------
# Rows: a read-only, index-able view over parquet tables and/or lists of dicts

class Rows:
    """Concatenation of segments (pyarrow Tables or lists of dicts), optionally seen through a permutation."""

    def __init__(self, segments, order=None):
        self.segments = [s for s in segments if len(s) > 0]
        self.offsets = [0]
        for seg in self.segments:
            self.offsets.append(self.offsets[-1] + len(seg))
        self.order = order

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        if self.order is not None:
            index = int(self.order[index])
        seg_idx = bisect.bisect_right(self.offsets, index) - 1
        seg = self.segments[seg_idx]
        local = index - self.offsets[seg_idx]
        if isinstance(seg, pa.Table):
            return seg.slice(local, 1).to_pylist()[0]
        return seg[local]

    def shuffled(self, seed=42):
        """Same permutation as HF datasets' `Dataset.shuffle(seed=seed)`."""
        order = np.random.default_rng(seed).permutation(len(self))
        if self.order is not None:
            order = np.asarray(self.order)[order]
        return Rows(self.segments, order=order)


def read_jsonl(path):
    """One JSON object per line (.jsonl or .jsonl.gz). Split on '\\n' only: str.splitlines() would also
    break on U+2028, which some real data contains inside strings."""
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            row, problem = parse_jsonl_line(raw)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}")
            if row is not None:
                rows.append(row)
    return rows


def read_data_file(path):
    """A parquet file → pyarrow Table; a jsonl/json file → list of dicts."""
    if path.endswith(".parquet"):
        return pq.read_table(path)
    if path.endswith(".jsonl") or path.endswith(".jsonl.gz"):
        return read_jsonl(path)
    if path.endswith(".json"):
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} wrappers
            data = data.get("data", data.get("rows", data))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    raise ValueError(f"{path}: unsupported task data file (use .parquet, .jsonl(.gz) or .json)")


def rows_from_files(paths):
    return Rows([read_data_file(p) for p in paths])


# -----------------------------------------------------------------------------
# Local copies

def _files_matching(pattern):
    return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))


def find_local_files(path, name, config, split, default_config=None, extra_filenames=()):
    """The data files for (config, split) at `path` (a file, or a folder in one of the layouts above), or []."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        return []
    roots = [path]
    sub = os.path.join(path, name.lower())
    if os.path.isdir(sub):
        roots.insert(0, sub)
    for root in roots:
        for ext in DATA_EXTENSIONS:
            candidates = []
            if config is not None:
                candidates += [
                    os.path.join(root, config, split, f"*.{ext}"),
                    os.path.join(root, config, f"{split}.{ext}"),
                    os.path.join(root, config, f"{split}-*.{ext}"),
                    os.path.join(root, f"{config}-{split}.{ext}"),
                ]
            if config is None or config == default_config:
                candidates += [
                    os.path.join(root, f"{split}.{ext}"),
                    os.path.join(root, f"{split}-*.{ext}"),
                    os.path.join(root, "data", f"{split}-*.{ext}"),
                ]
            for pattern in candidates:
                files = _files_matching(pattern)
                if files:
                    return files
        for filename in extra_filenames:
            candidate = os.path.join(root, filename)
            if os.path.isfile(candidate):
                return [candidate]
    return []


# -----------------------------------------------------------------------------
# Hub parquet export

def cache_dir_for(repo_id, config, split):
    return os.path.join(get_base_dir(), "task_data", repo_id.replace("/", "--"), config, split)


def _rebase(url, endpoint):
    """Listings from a mirror may still name huggingface.co; fetch through the configured endpoint instead."""
    if url.startswith("/"):
        return endpoint + url
    if endpoint != DEFAULT_HF_ENDPOINT and url.startswith(DEFAULT_HF_ENDPOINT + "/"):
        return endpoint + url[len(DEFAULT_HF_ENDPOINT):]
    return url


def list_parquet_urls(repo_id, config, split, timeout=30):
    """URLs of a split's parquet files: the /parquet API first, then the refs/convert/parquet tree listing."""
    endpoint = hf_endpoint()
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}  # gated/private datasets, rate limits
    errors = []
    api_url = f"{endpoint}/api/datasets/{repo_id}/parquet/{config}/{split}"
    try:
        r = requests.get(api_url, timeout=timeout, headers=headers)
        r.raise_for_status()
        urls = r.json()
        if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
            return [_rebase(u, endpoint) for u in urls]
        errors.append(f"{api_url}: unexpected answer {str(urls)[:200]}")
    except (requests.RequestException, ValueError) as e:
        errors.append(f"{api_url}: {e}")
    tree_url = f"{endpoint}/api/datasets/{repo_id}/tree/refs%2Fconvert%2Fparquet/{config}/{split}"
    try:
        r = requests.get(tree_url, timeout=timeout, headers=headers)
        r.raise_for_status()
        entries = r.json()
        paths = sorted(e["path"] for e in entries
                       if isinstance(e, dict) and e.get("type", "file") == "file" and e.get("path", "").endswith(".parquet"))
        if paths:
            return [f"{endpoint}/datasets/{repo_id}/resolve/refs%2Fconvert%2Fparquet/{p}" for p in paths]
        errors.append(f"{tree_url}: no parquet files listed")
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:
        errors.append(f"{tree_url}: {e}")
    raise ConnectionError("; ".join(errors))


def _cached_files(cache_dir):
    manifest_path = os.path.join(cache_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path, "r", encoding="utf-8") as f:
        manifest = json.load(f)
    files = [os.path.join(cache_dir, name) for name in manifest["files"]]
    return files if all(os.path.exists(p) for p in files) else None


def download_hub_split(repo_id, config, split):
    """Download (once) a split's parquet export into the task_data cache; returns the local file paths."""
    cache_dir = cache_dir_for(repo_id, config, split)
    files = _cached_files(cache_dir)
    if files is not None:
        return files
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(os.path.join(cache_dir, ".manifest.lock")):
        files = _cached_files(cache_dir)  # another rank may have finished while we waited
        if files is not None:
            return files
        urls = list_parquet_urls(repo_id, config, split)
        names = [f"{i:05d}.parquet" for i in range(len(urls))]
        for i, (url, name) in enumerate(zip(urls, names)):
            download_file(url, os.path.join(cache_dir, name), desc=f"{repo_id} {config}/{split} {i + 1}/{len(urls)}")
        num_rows = sum(pq.read_metadata(os.path.join(cache_dir, n)).num_rows for n in names)
        manifest = {"repo_id": repo_id, "config": config, "split": split, "urls": urls, "files": names,
                    "num_rows": num_rows}
        atomic_write_text(os.path.join(cache_dir, "manifest.json"), json.dumps(manifest, indent=1))
    return [os.path.join(cache_dir, n) for n in names]


# -----------------------------------------------------------------------------
# The one entry point tasks use

def load_task_rows(name, repo_id, config, split, data_path=None, default_config=None, extra_filenames=(), seed=42):
    """
    Rows of a task split, shuffled with `seed`: from data_path / NANOCHAT_TASK_DATA_<NAME> / NANOCHAT_TASK_DATA
    if given, else from the hub parquet export (cached). Raises TaskDataUnavailable saying what to set.
    """
    env_name = f"NANOCHAT_TASK_DATA_{name.upper()}"
    overrides = [("data_path", data_path), (env_name, os.environ.get(env_name)),
                 ("NANOCHAT_TASK_DATA", os.environ.get("NANOCHAT_TASK_DATA"))]
    for source, path in overrides:
        if not path:
            continue
        path = os.path.expanduser(path)
        files = find_local_files(path, name, config, split, default_config, extra_filenames)
        if files:
            return rows_from_files(files).shuffled(seed)
        if source != "NANOCHAT_TASK_DATA":  # an explicit per-task path that doesn't fit is a mistake, say so
            raise TaskDataUnavailable(
                f"{name}: {source}={path} has no data for config={config!r} split={split!r}. Give a "
                f".parquet/.jsonl/.json file, or a folder with e.g. {config}/{split}/*.parquet, "
                f"{config}-{split}.jsonl or {split}.jsonl.")
    try:
        files = download_hub_split(repo_id, config, split)
    except Exception as e:
        raise TaskDataUnavailable(
            f"{name}: could not get {repo_id} ({config}/{split}) from the hub at {hf_endpoint()} ({e}). "
            f"Either make the hub reachable (or set HF_ENDPOINT to a mirror), or point {env_name} "
            f"(or the task's data_path= argument) at a local .parquet/.jsonl file or folder with this split.") from e
    return rows_from_files(files).shuffled(seed)
