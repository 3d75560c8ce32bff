"""
The web_search tool: providers that answer a query, the text the model sees, and when to search at all.

A provider is anything with `search(query, k) -> [{"title": str, "url": str, "content": str}, ...]`, best first.
Two real ones:

- HTTPSearchProvider: a Tavily-compatible JSON API (POST {"query", "max_results", "api_key"?} ->
  {"results": [{"title", "url", "content", ...}]}). Retries timeouts, connection errors and 5xx with exponential
  backoff; a 4xx is the caller's mistake and fails at once. Every failure is a SearchError saying what to do.
- LocalSearchProvider(folder): BM25 (the `bm25s` library) over .txt/.md/.jsonl/.parquet files, offline. The index
  is cached under $NANOCHAT_BASE_DIR/search_index/ and rebuilt when any file in the folder changes.

Both trim their results to a token budget. `format_results` turns results into the bounded tool output text;
`run_web_search` is what the Engine calls (errors come back as text, never as an exception).

When to search ("auto" mode) is decided by rules, in nanochat.search_classifier (needs_web_search and
needs_web_search_contextual, re-exported here under the names the forks use).

Environment (read by provider_from_env and HTTPSearchProvider):
    NANOCHAT_SEARCH_URL      the search endpoint, e.g. https://api.tavily.com/search
    NANOCHAT_SEARCH_API_KEY  its key (sent as a Bearer header and as "api_key" in the body, as Tavily accepts)
    NANOCHAT_SEARCH_DOCS     a folder of documents for LocalSearchProvider when no URL is set
The folder nanochat/data/search_docs (DEMO_DOCS_DIR) holds fictional demo documents for the offline demo.
"""

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time
import uuid

import bm25s
import numpy as np
import pyarrow.parquet as pq
import requests
import Stemmer

from nanochat.common import get_base_dir
from nanochat.fileio import iter_jsonl
from nanochat.search_classifier import needs_web_search, needs_web_search_contextual  # noqa: F401 (re-export)

logger = logging.getLogger(__name__)

SEARCH_URL_ENV = "NANOCHAT_SEARCH_URL"
SEARCH_API_KEY_ENV = "NANOCHAT_SEARCH_API_KEY"
SEARCH_DOCS_ENV = "NANOCHAT_SEARCH_DOCS"
DEMO_DOCS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "search_docs")

DEFAULT_MAX_TOKENS = 512         # all results of one search together
DEFAULT_TOOL_OUTPUT_CHARS = 1500  # what format_results hands the model


class SearchError(RuntimeError):
    """A search failed; the message says what went wrong and what to do."""


def _check_query(query, k):
    if not isinstance(query, str) or not query.strip():
        raise SearchError(f"web_search needs a non-empty query string, got {query!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SearchError(f"web_search needs k >= 1 results, got {k!r}")


# -----------------------------------------------------------------------------
# Token budget

def approx_token_count(text):
    """Tokens without a tokenizer: ~4 characters per token, the usual rule of thumb for English BPE. Good enough to
    bound a tool output, and the providers then work before (or without) a tokenizer is loaded. Pass
    `count_tokens=lambda s: len(tokenizer.encode(s))` to a provider for exact counts."""
    return (len(text) + 3) // 4


def truncate_to_tokens(text, max_tokens, count_tokens=approx_token_count):
    """The longest prefix of `text` (cut at a space when there is one near the end) that fits in max_tokens,
    with "..." appended when anything was cut."""
    if count_tokens(text) <= max_tokens:
        return text
    if max_tokens <= 0:
        return ""
    lo, hi = 0, len(text)  # binary search: the longest prefix whose count (with the marker) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid] + "...") <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    prefix = text[:lo]
    if lo < len(text) and not text[lo].isspace():  # the cut splits a word: end at the space before it instead
        space = prefix.rfind(" ")
        if space > len(prefix) // 2:
            prefix = prefix[:space]
    return prefix.rstrip() + "..." if prefix.strip() else ""


def trim_to_token_budget(results, max_tokens=DEFAULT_MAX_TOKENS, count_tokens=approx_token_count):
    """Give each result an equal share of max_tokens (title and url count too) and cut its content to fit, so the
    lower-ranked results are shortened rather than dropped."""
    if not results:
        return []
    share = max_tokens // len(results)
    trimmed = []
    for result in results:
        header_tokens = count_tokens(result["title"]) + count_tokens(result["url"])
        content = truncate_to_tokens(result["content"], share - header_tokens, count_tokens)
        trimmed.append({"title": result["title"], "url": result["url"], "content": content})
    return trimmed


# -----------------------------------------------------------------------------
# HTTP provider (Tavily-compatible)

class HTTPSearchProvider:
    """POSTs {"query", "max_results"} (plus the key) as JSON to a Tavily-compatible endpoint.

    url/api_key default to $NANOCHAT_SEARCH_URL / $NANOCHAT_SEARCH_API_KEY. Timeouts, connection errors and 5xx are
    retried max_retries times, waiting backoff_seconds * 2**attempt in between; 4xx and malformed answers are not.
    """

    def __init__(self, url=None, api_key=None, timeout=10.0, max_retries=2, backoff_seconds=0.5,
                 max_tokens=DEFAULT_MAX_TOKENS, count_tokens=approx_token_count):
        self.url = url or os.environ.get(SEARCH_URL_ENV, "").strip()
        if not self.url:
            raise SearchError(f"no search API URL: set {SEARCH_URL_ENV} (for Tavily: https://api.tavily.com/search)"
                              f", or search a local folder of documents with {SEARCH_DOCS_ENV}=/path/to/docs")
        self.api_key = api_key if api_key is not None else os.environ.get(SEARCH_API_KEY_ENV, "").strip()
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens

    def search(self, query, k=5):
        _check_query(query, k)
        payload = {"query": query, "max_results": k}
        headers = {"Accept": "application/json"}
        if self.api_key:
            payload["api_key"] = self.api_key  # Tavily's original place for the key...
            headers["Authorization"] = f"Bearer {self.api_key}"  # ...and its current one; others read either
        response = self._post_with_retries(payload, headers)
        results = _parse_results(response, self.url)[:k]
        return trim_to_token_budget(results, self.max_tokens, self.count_tokens)

    def _post_with_retries(self, payload, headers):
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                response = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout)
            except requests.Timeout:  # before ConnectionError: ConnectTimeout is both
                problem = f"timed out after {self.timeout}s"
            except requests.ConnectionError as e:
                problem = f"could not connect ({type(e).__name__})"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500:
                    raise SearchError(_client_error_message(self.url, response))
                problem = f"server error HTTP {response.status_code}"
            if attempt + 1 < attempts:
                logger.warning(f"search API {self.url}: {problem}; retrying ({attempt + 1}/{self.max_retries})")
                time.sleep(self.backoff_seconds * 2 ** attempt)
        raise SearchError(f"search API {self.url}: {problem} on all {attempts} attempts; check that the service is up "
                          f"and reachable, or raise timeout/max_retries")


def _client_error_message(url, response):
    status = response.status_code
    body = response.text[:200].strip()
    if status in (401, 403):
        hint = f"the API key was refused: check {SEARCH_API_KEY_ENV}"
    elif status == 429:
        hint = "rate-limited: wait before searching again, or raise the plan's limit"
    elif status == 404:
        hint = f"no search endpoint there: check {SEARCH_URL_ENV}"
    else:
        hint = f"the request was rejected: check {SEARCH_URL_ENV} points at a Tavily-compatible search API"
    return f"search API {url} answered HTTP {status} ({body!r}): {hint}"


def _parse_results(response, url):
    """The response's results as [{"title", "url", "content"}] (strings), or a SearchError naming the problem."""
    try:
        data = response.json()
    except ValueError:
        raise SearchError(f"search API {url} answered malformed JSON (HTTP {response.status_code}, starts "
                          f"{response.text[:120]!r}): check {SEARCH_URL_ENV} points at a JSON search API") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SearchError(f"search API {url} answered without a 'results' list (got {found}): "
                          f"is {SEARCH_URL_ENV} a Tavily-compatible API?")
    results = []
    for item in data["results"]:
        if not isinstance(item, dict):
            raise SearchError(f"search API {url} answered a result that is not an object: {item!r:.120}")
        results.append({field: str(item.get(field) or "") for field in ("title", "url", "content")})
    return results


# -----------------------------------------------------------------------------
# Local provider: BM25 over a folder of documents

# bm25s: sparse-matrix BM25 (numpy only, saves/loads its index, no downloads); PyStemmer (a compiled Snowball
# stemmer, no data files) so "prices" finds "price". Same tokenizer for documents and queries.
_STEMMER = Stemmer.Stemmer("english")
INDEX_FORMAT = 1  # bump when what the cache holds changes
DOCUMENT_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")


def _bm25_tokens(texts):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, return_ids=False, show_progress=False)


class LocalSearchProvider:
    """BM25 over the .txt/.md/.jsonl/.parquet files under `path` (recursive, hidden files skipped).

    A .txt/.md file is one document (title: its first line, without '#'); each .jsonl line / parquet row is one
    (text from "text" or "content", title from "title" when present), with url file:///...#row=N (N from 0).
    The index is cached under cache_dir (default $NANOCHAT_BASE_DIR/search_index/<folder hash>/) and rebuilt
    when the folder's files change (checked on every search: one stat per file).
    """

    def __init__(self, path, cache_dir=None, max_tokens=DEFAULT_MAX_TOKENS, count_tokens=approx_token_count):
        self.folder = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.folder):
            raise SearchError(f"search document folder {path} does not exist (or is not a folder): "
                              f"point {SEARCH_DOCS_ENV} at a folder of .txt/.md/.jsonl/.parquet files")
        folder_key = hashlib.sha256(self.folder.encode()).hexdigest()[:16]
        self.cache_dir = cache_dir or os.path.join(get_base_dir(), "search_index", folder_key)
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens
        self._lock = threading.Lock()  # a server may search from several threads
        self._fingerprint = None
        self._retriever = None
        self._documents = []

    def search(self, query, k=5):
        _check_query(query, k)
        with self._lock:
            self._refresh()
            retriever, documents = self._retriever, self._documents
        if retriever is None:
            return []
        query_tokens = [token for token in _bm25_tokens([query])[0] if token in retriever.vocab_dict]
        if not query_tokens:
            return []
        scores = retriever.get_scores(query_tokens)
        best = np.argsort(-scores, kind="stable")[:k]
        results = [dict(documents[i]) for i in best if scores[i] > 0]
        return trim_to_token_budget(results, self.max_tokens, self.count_tokens)

    def documents(self):
        """Every document of the folder as indexed ({"title", "url", "content"}, in file order), e.g. to write
        questions about them (scripts/gen_think_tool_data.py)."""
        with self._lock:
            self._refresh()
            return [dict(doc) for doc in self._documents]

    def index_dir(self):
        """Where the index for the folder as it is now lives (built or not)."""
        return os.path.join(self.cache_dir, _fingerprint(self.folder, _document_files(self.folder)))

    def _refresh(self):
        files = _document_files(self.folder)
        fingerprint = _fingerprint(self.folder, files)
        if fingerprint == self._fingerprint:
            return
        index_dir = os.path.join(self.cache_dir, fingerprint)
        if not os.path.isfile(os.path.join(index_dir, "documents.jsonl")):
            _build_index(self.folder, files, self.cache_dir, index_dir)
        self._retriever, self._documents = _load_index(index_dir)
        self._fingerprint = fingerprint
        _remove_other_indexes(self.cache_dir, keep=fingerprint)


def _document_files(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if not name.startswith(".") and name.lower().endswith(DOCUMENT_EXTENSIONS))
    return found


def _fingerprint(folder, files):
    """A name for this exact set of file versions: path, size and mtime of each, plus the index format."""
    h = hashlib.sha256(f"{INDEX_FORMAT} bm25s={bm25s.__version__}\n".encode())
    for path in files:
        stat = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _build_index(folder, files, cache_dir, index_dir):
    t0 = time.time()
    documents = [doc for path in files for doc in _read_documents(path)]
    logger.info(f"indexing {len(documents)} documents from {len(files)} files under {folder}")
    # Build in a private folder, then rename it into place in one step: a reader never sees half an index, and
    # of two processes building the same index the second simply keeps the first one's.
    os.makedirs(cache_dir, exist_ok=True)
    tmp_dir = os.path.join(cache_dir, f".building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp_dir)
    try:
        tokens = _bm25_tokens([f"{doc['title']}\n{doc['content']}" for doc in documents])
        if any(tokens):  # bm25s cannot index a corpus without a single word; such a folder matches nothing
            retriever = bm25s.BM25()
            retriever.index(tokens, show_progress=len(documents) > 10_000)
            retriever.save(tmp_dir, show_progress=False)
        with open(os.path.join(tmp_dir, "documents.jsonl"), "w", encoding="utf-8") as f:
            for doc in documents:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.rename(tmp_dir, index_dir)
    except OSError:
        if not os.path.isfile(os.path.join(index_dir, "documents.jsonl")):
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(f"index of {len(documents)} documents ready in {time.time() - t0:.1f}s ({index_dir})")


def _load_index(index_dir):
    with open(os.path.join(index_dir, "documents.jsonl"), encoding="utf-8") as f:
        documents = [json.loads(line) for line in f]
    has_index = os.path.exists(os.path.join(index_dir, "params.index.json"))
    retriever = bm25s.BM25.load(index_dir, show_progress=False) if has_index else None
    return retriever, documents


def _remove_other_indexes(cache_dir, keep):
    for name in os.listdir(cache_dir):
        if name != keep and not name.startswith("."):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _read_documents(path):
    """The documents in one file, as {"title", "url", "content"} dicts."""
    url = pathlib.Path(path).absolute().as_uri()
    extension = os.path.splitext(path)[1].lower()
    if extension in (".txt", ".md"):
        with open(path, encoding="utf-8", errors="replace") as f:
            return [_text_document(f.read(), url, path)]
    rows = _jsonl_rows(path) if extension == ".jsonl" else _parquet_rows(path)
    name = os.path.basename(path)
    return [{"title": title or f"{name} row {i}", "url": f"{url}#row={i}", "content": text}
            for i, (title, text) in enumerate(rows)]


def _text_document(text, url, path):
    lines = text.strip().splitlines()
    first_line = lines[0].strip() if lines else ""
    if first_line and len(first_line) <= 120:
        return {"title": first_line.lstrip("#").strip(), "url": url, "content": "\n".join(lines[1:]).strip()}
    return {"title": os.path.splitext(os.path.basename(path))[0], "url": url, "content": text.strip()}


def _row_text(row, where):
    """(title, text) of one jsonl/parquet record."""
    if isinstance(row, str):
        return "", row
    if not isinstance(row, dict):
        raise SearchError(f"{where}: expected a JSON object with a 'text' or 'content' field, got {row!r:.80}")
    text = row.get("text", row.get("content"))
    if not isinstance(text, str):
        raise SearchError(f"{where}: no 'text' or 'content' string (keys: {sorted(row)}); add one or move the file "
                          f"out of the search folder")
    return str(row.get("title") or ""), text


def _jsonl_rows(path):
    rows = []
    for line_number, row, problem in iter_jsonl(path):
        if problem is not None:
            raise SearchError(f"{path}:{line_number}: {problem}; fix the line or move the file out of the search "
                              f"folder")
        rows.append(_row_text(row, f"{path}:{line_number}"))
    return rows


def _parquet_rows(path):
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    text_column = next((c for c in ("text", "content") if c in names), None)
    if text_column is None:
        raise SearchError(f"{path}: no 'text' or 'content' column (columns: {names}); add one or move the file out "
                          f"of the search folder")
    columns = [text_column] + (["title"] if "title" in names else [])
    rows = []
    for batch in parquet.iter_batches(columns=columns):
        for row in batch.to_pylist():
            rows.append((str(row.get("title") or ""), str(row[text_column] or "")))
    return rows


# -----------------------------------------------------------------------------
# Choosing a provider, and the text the model sees

def provider_from_env(docs_dir=None):
    """HTTPSearchProvider when $NANOCHAT_SEARCH_URL is set; else LocalSearchProvider over docs_dir or
    $NANOCHAT_SEARCH_DOCS; else None (no web_search)."""
    if os.environ.get(SEARCH_URL_ENV, "").strip():
        return HTTPSearchProvider()
    folder = docs_dir or os.environ.get(SEARCH_DOCS_ENV, "").strip()
    return LocalSearchProvider(folder) if folder else None


def _one_line(text):
    return re.sub(r"\s+", " ", str(text)).strip()


def _clip(text, max_chars):
    return text if len(text) <= max_chars else truncate_to_tokens(text, max_chars, count_tokens=len)


def format_results(results, max_chars=DEFAULT_TOOL_OUTPUT_CHARS):
    """Results as the tool output the model reads, at most max_chars long:

        [1] Title
        url
        content (whitespace collapsed, cut to this result's share of max_chars)
    """
    if not results:
        return "No results found."
    share = max(max_chars // len(results) - 2, 1)  # 2: the blank line between results
    blocks = []
    for i, result in enumerate(results, 1):
        head = f"[{i}] {_one_line(result.get('title', ''))}\n{_one_line(result.get('url', ''))}\n"
        blocks.append(_clip(head + _one_line(result.get("content", "")), share))
    return _clip("\n\n".join(blocks), max_chars)


def run_web_search(provider, query, k=3, max_chars=DEFAULT_TOOL_OUTPUT_CHARS):
    """What the web_search tool returns to the model: formatted results, or one line saying why there are none.
    Never raises for a failed search (a tool error is text the model sees, not a crash)."""
    if provider is None:
        return f"web_search error: no search provider configured (set {SEARCH_URL_ENV} or {SEARCH_DOCS_ENV})"
    try:
        return format_results(provider.search(query, k), max_chars)
    except SearchError as e:
        return f"web_search error: {e}"
