"""
An offline pretraining corpus built from what every Python installation carries, so the CPU demo runs on a
machine with no network at all:

- the language reference topics pydoc shows for `help("FOR")` etc. (`pydoc_data.topics.topics`),
- API documentation of the C modules (builtins, math, itertools, ...), read with `inspect` after importing them,
- API documentation of the pure-Python standard library (module/class/function docstrings), read with
  `ast.get_docstring` from the source -- nothing is imported, so no module's import side effects can run,
- the standard library's sources (then its test suite), cut into chunks at top-level definitions,
- only if that is still short of `target_chars` (a distro Python without its test suite): docs and sources of
  the installed site-packages, package by package in sorted order until the target is reached.

Documents are deduplicated, sorted by origin, then shuffled with a fixed seed, so the same installation always
gives the same corpus. They are written like ClimbMix: parquet shards with one `text` column,
`shard_00000.parquet ...`, row groups of 1024 documents, and the last shard is the validation split
(1024 documents, or a tenth of a tiny corpus). The val shard uses smaller row groups (128 docs) so that up to
8 DDP ranks each get a disjoint share of it. Documents are at most 4000 characters (about a 1K-token row):
longer texts are cut at definitions / blank lines, because the packer would crop a long document to one row.

    python -m nanochat.dataset --offline      # -> $NANOCHAT_BASE_DIR/base_data_offline/
"""

import os
import re
import ast
import sys
import time
import shutil
import random
import hashlib
import inspect
import warnings
import sysconfig
import importlib
import site
from multiprocessing import Pool

import pyarrow as pa
import pyarrow.parquet as pq
from pydoc_data.topics import topics
from tqdm import tqdm

from nanochat.common import get_base_dir
from nanochat.fileio import atomic_open

DOC_CHARS = 4000          # longer texts are cut into documents of at most this many characters
MIN_DOC_CHARS = 64        # shorter documents carry too little to learn from
MAX_FILE_BYTES = 2_000_000
ROW_GROUP_DOCS = 1024
SHARD_DOCS = 8 * ROW_GROUP_DOCS
VAL_DOCS = 1024
VAL_ROW_GROUP_DOCS = 128
DEFAULT_TARGET_CHARS = 24_000_000

# C modules we never import: GUI toolkits, terminal state changers, CPython's internal test helpers.
SKIP_C_MODULES = {"_tkinter", "readline", "_curses", "_curses_panel", "antigravity", "this", "__main__"}
SKIP_C_PREFIXES = ("_test", "_xx", "xx", "_ctypes_test")
# Directories whose .py files are not worth training on (or duplicate another source).
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "lib2to3/tests/data",
             "test/tokenizedata", "test/encoded_modules", "test/bad_getattr"}


# -----------------------------------------------------------------------------
# Splitting long texts into documents

_TOP_LEVEL = re.compile(r"(def |class |async def |@|if __name__)")
_METHOD_LEVEL = re.compile(r"    (def |class |async def |@)")


def _split_lines(lines, is_boundary, max_chars):
    """Cut a list of lines into pieces at lines where is_boundary(i) holds, then merge consecutive pieces
    greedily while they fit in max_chars. Comment lines right above a boundary stay with what follows."""
    starts = [0]
    for i in range(1, len(lines)):
        if is_boundary(i):
            j = i
            while j - 1 > starts[-1] and lines[j - 1].lstrip().startswith("#"):
                j -= 1
            if j > starts[-1]:
                starts.append(j)
    pieces = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]
    merged, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            merged.append(current)
            current = ""
        current += piece
    if current:
        merged.append(current)
    return merged


def split_text(text, max_chars=DOC_CHARS):
    """Chunks of at most max_chars: cut at blank lines, then between lines, then (a giant line) anywhere."""
    lines = text.splitlines(keepends=True)
    chunks = []
    for piece in _split_lines(lines, lambda i: lines[i - 1].strip() == "", max_chars):
        if len(piece) <= max_chars:
            chunks.append(piece)
            continue
        for part in _split_lines(piece.splitlines(keepends=True), lambda i: True, max_chars):
            chunks.extend(part[i:i + max_chars] for i in range(0, len(part), max_chars))
    return chunks


def split_source(text, max_chars=DOC_CHARS):
    """Chunks of a Python source of at most max_chars, cut at top-level definitions, then (inside a big class)
    at method definitions, then as plain text (blank lines, lines)."""
    lines = text.splitlines(keepends=True)
    chunks = []
    for piece in _split_lines(lines, lambda i: _TOP_LEVEL.match(lines[i]) is not None, max_chars):
        if len(piece) <= max_chars:
            chunks.append(piece)
            continue
        sub = piece.splitlines(keepends=True)
        for part in _split_lines(sub, lambda i: _METHOD_LEVEL.match(sub[i]) is not None, max_chars):
            chunks.extend([part] if len(part) <= max_chars else split_text(part, max_chars))
    return chunks


def split_entries(header, entries, max_chars=DOC_CHARS):
    """Join documentation entries under a header into documents of at most ~max_chars. Entries are kept whole
    unless one alone is too long, then it is cut like plain text."""
    pieces = []
    for entry in entries:
        pieces.extend([entry] if len(entry) <= max_chars else split_text(entry, max_chars))
    docs, current = [], header
    for piece in pieces:
        if current != header and len(current) + len(piece) + 2 > max_chars:
            docs.append(current)
            current = header.rstrip(":\n") + " (continued):\n\n"
        current += piece.rstrip("\n") + "\n\n"
    if current != header:
        docs.append(current)
    return [d.rstrip() + "\n" for d in docs]


def _indent(text, prefix):
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


# -----------------------------------------------------------------------------
# Sources of documents. Each yields (key, text); the key fixes the order before the seeded shuffle.

def pydoc_topic_docs():
    for name in sorted(topics):
        for i, chunk in enumerate(split_text(topics[name])):
            yield (f"0topics/{name}/{i:04d}", f"Python language reference: {name}\n\n{chunk}")


def _c_module_names():
    names = set(sys.builtin_module_names)
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        for filename in os.listdir(dynload):
            if filename.endswith(".so") or filename.endswith(".pyd"):
                names.add(filename.split(".")[0])
    return sorted(n for n in names if n not in SKIP_C_MODULES and not n.startswith(SKIP_C_PREFIXES))


def _signature(obj):
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _render_object_entries(modname, module):
    entries = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj) and getattr(obj, "__module__", None) == modname:
            doc = inspect.getdoc(obj)
            if doc:
                entries.append(f"class {modname}.{name}:\n" + _indent(doc, "    ").rstrip())
            for attr in sorted(vars(obj)):
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                member = vars(obj)[attr]
                member_doc = getattr(member, "__doc__", None)
                if isinstance(member_doc, str) and member_doc.strip() and callable(member):
                    entries.append(f"{modname}.{name}.{attr}{_signature(member)}\n" +
                                   _indent(inspect.cleandoc(member_doc), "    ").rstrip())
        elif inspect.isbuiltin(obj) or inspect.isroutine(obj):
            doc = inspect.getdoc(obj)
            if doc:
                entries.append(f"{modname}.{name}{_signature(obj)}\n" + _indent(doc, "    ").rstrip())
    return entries


def c_module_docs():
    """API docs of built-in and extension modules (import only; their docs are not in any .py file)."""
    for modname in _c_module_names():
        try:
            with warnings.catch_warnings():  # e.g. DeprecationWarnings of modules slated for removal
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except BaseException:  # noqa: BLE001 - a module that cannot load here just contributes nothing
            continue
        header = f"Help on built-in module {modname}:\n\n"
        intro = inspect.getdoc(module) or ""
        entries = ([intro] if intro else []) + _render_object_entries(modname, module)
        for i, doc in enumerate(split_entries(header, entries)):
            yield (f"1cdocs/{modname}/{i:04d}", doc)


def _function_entry(node, qualname):
    doc = ast.get_docstring(node)
    if not doc:
        return None
    try:
        args = ast.unparse(node.args)
    except Exception:  # noqa: BLE001
        args = "..."
    return f"def {qualname}({args})\n" + _indent(doc, "    ").rstrip()


def api_doc_entries(modname, tree):
    """Module, class, function and method docstrings of a parsed module, rendered like pydoc's text output
    (one entry per class and per function/method, each under its qualified name)."""
    entries = []
    doc = ast.get_docstring(tree)
    if doc:
        entries.append(doc)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            entries.append(_function_entry(node, f"{modname}.{node.name}"))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            class_doc = ast.get_docstring(node)
            if class_doc:
                bases = ", ".join(ast.unparse(b) for b in node.bases)
                entries.append(f"class {modname}.{node.name}({bases}):\n" + _indent(class_doc, "    ").rstrip())
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        (not item.name.startswith("_") or item.name in ("__init__", "__call__")):
                    entries.append(_function_entry(item, f"{modname}.{node.name}.{item.name}"))
    return [e for e in entries if e]


def _module_name(relpath):
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _read_python_file(path):
    if os.path.getsize(path) > MAX_FILE_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError):
        return None
    if "decoding_table = (" in text or "\x00" in text:  # generated codec tables, binary junk
        return None
    return text


def process_python_file(job):
    """(group, root, relpath, with_api_docs) -> list of (key, text). Runs in a worker process."""
    group, root, relpath, with_api_docs = job
    text = _read_python_file(os.path.join(root, relpath))
    if text is None:
        return []
    out = []
    if with_api_docs:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            tree = None
        if tree is not None:
            modname = _module_name(relpath)
            header = f"Help on module {modname}:\n\n"
            for i, doc in enumerate(split_entries(header, api_doc_entries(modname, tree))):
                out.append((f"{group}docs/{relpath}/{i:04d}", doc))
    for i, chunk in enumerate(split_source(text)):
        out.append((f"{group}src/{relpath}/{i:04d}", f"# {relpath}\n{chunk}"))
    return out


def _python_files(root, skip_dirs=SKIP_DIRS, only=None):
    """Sorted relative paths of .py files under root (os.walk order is not deterministic, so sort)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if (rel_dir + d) not in skip_dirs and d not in skip_dirs
                             and not d.startswith("."))
        for filename in filenames:
            if filename.endswith(".py"):
                relpath = rel_dir + filename
                if only is None or only(relpath):
                    found.append(relpath)
    return sorted(found)


def _is_test_path(relpath):
    parts = relpath.split("/")
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1])


# -----------------------------------------------------------------------------
# Building the corpus

def _keep(text):
    return len(text.strip()) >= MIN_DOC_CHARS


ALL_SOURCES = ("topics", "cdocs", "stdlib", "tests", "site")


def collect_documents(target_chars=DEFAULT_TARGET_CHARS, num_workers=None, verbose=True, sources=ALL_SOURCES):
    """All documents of the corpus as (key, text), deduplicated, in collection order. sources picks among
    ALL_SOURCES (tests use a cheap subset); "site" only tops up while the total is below target_chars."""
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    docs, seen, total = [], set(), 0

    def add(pairs, label):
        nonlocal total
        before_docs, before_chars = len(docs), total
        for key, text in pairs:
            digest = hashlib.sha1(text.split("\n", 1)[-1].encode("utf-8", "surrogatepass")).digest()
            if not _keep(text) or digest in seen:
                continue
            seen.add(digest)
            docs.append((key, text))
            total += len(text)
        if verbose:
            print(f"  {label}: {len(docs) - before_docs:,} docs, {(total - before_chars) / 1e6:.1f}M chars")

    def run_files(group, root, relpaths, with_api_docs, desc):
        jobs = [(group, root, p, with_api_docs) for p in relpaths]
        out = []
        with Pool(num_workers) as pool:
            results = pool.imap(process_python_file, jobs, chunksize=8)
            for pairs in tqdm(results, total=len(jobs), desc=desc, disable=not verbose, leave=False):
                out.extend(pairs)
        return out

    stdlib = sysconfig.get_paths()["stdlib"]
    if "topics" in sources:
        add(pydoc_topic_docs(), "pydoc language reference topics")
    if "cdocs" in sources:
        add(c_module_docs(), "built-in/extension module docs")
    if "stdlib" in sources:
        add(run_files("2", stdlib, _python_files(stdlib, only=lambda p: not _is_test_path(p)), True, "stdlib"),
            "stdlib API docs + sources")
    if "tests" in sources:
        add(run_files("3", stdlib, _python_files(stdlib, only=_is_test_path), False, "stdlib tests"),
            "stdlib test suite sources")
    if "site" in sources and total < target_chars:
        # A Python without its test suite (e.g. a distro's python3) is short: top up from site-packages.
        roots = [p for p in site.getsitepackages() if os.path.isdir(p)]
        for root in roots:
            for top in sorted(os.listdir(root)):
                if total >= target_chars:
                    break
                path = os.path.join(root, top)
                if top.startswith((".", "_")) or not (os.path.isdir(path) or top.endswith(".py")):
                    continue
                if os.path.isdir(path):
                    relpaths = [f"{top}/{p}" for p in _python_files(path, only=lambda p: not _is_test_path(p))]
                else:
                    relpaths = [top]
                add(run_files("4", root, relpaths, True, top), f"site-packages/{top}")
    return docs


def write_corpus(texts, out_dir, verbose=True):
    """Write documents as parquet shards into out_dir; the last shard is val (VAL_DOCS documents, or a tenth of
    a small corpus). Returns the list of shard paths."""
    if len(texts) < 2:
        raise RuntimeError(f"only {len(texts)} documents collected: this Python installation seems to lack its "
                           f"standard library sources; use --data-dir with your own text instead")
    num_val = min(VAL_DOCS, max(1, len(texts) // 10))
    train, val = texts[:-num_val], texts[-num_val:]
    shards = [(train[i:i + SHARD_DOCS], ROW_GROUP_DOCS) for i in range(0, len(train), SHARD_DOCS)]
    shards.append((val, VAL_ROW_GROUP_DOCS))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index, (shard_texts, row_group_docs) in enumerate(shards):
        path = os.path.join(out_dir, f"shard_{index:05d}.parquet")
        table = pa.table({"text": pa.array(shard_texts, type=pa.string())})
        with atomic_open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_docs, compression="zstd")
        paths.append(path)
    if verbose:
        print(f"Wrote {len(shards)} shards ({len(shards) - 1} train + 1 val) to {out_dir}")
    return paths


def build_offline_corpus(out_dir=None, seed=42, target_chars=DEFAULT_TARGET_CHARS, force=False, num_workers=None,
                         verbose=True, sources=ALL_SOURCES):
    """Build (or reuse) the offline corpus; returns the list of shard paths."""
    if out_dir is None:
        out_dir = os.path.join(get_base_dir(), "base_data_offline")
    existing = sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet")) if os.path.isdir(out_dir) else []
    if existing and not force:
        if verbose:
            print(f"Offline corpus already built: {len(existing)} shards in {out_dir} (pass --force to rebuild)")
        return [os.path.join(out_dir, f) for f in existing]
    t0 = time.time()
    if verbose:
        print(f"Building the offline corpus from Python {sys.version.split()[0]} at {sys.base_prefix}")
    docs = collect_documents(target_chars=target_chars, num_workers=num_workers, verbose=verbose, sources=sources)
    docs.sort(key=lambda kv: kv[0])
    texts = [text for _, text in docs]
    random.Random(seed).shuffle(texts)
    # Write next to the destination, then swap it in, so an interrupted build never leaves half a corpus.
    tmp_dir = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    write_corpus(texts, tmp_dir, verbose=False)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    paths = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".parquet"))
    if verbose:
        num_chars = sum(len(t) for t in texts)
        print(f"Offline corpus: {len(texts):,} documents, {num_chars:,} characters, {len(paths)} shards "
              f"({len(paths) - 1} train + 1 val) in {out_dir} [{time.time() - t0:.1f}s]")
    return paths
