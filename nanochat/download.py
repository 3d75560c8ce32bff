"""
Robust file downloads, shared by every stage that fetches something (data shards, eval bundle, word lists).

- streams in 1 MB chunks to `<dest>.tmp` and renames it into place, so `dest` is either absent or complete;
- checks the size against Content-Length (and `expected_size` if the caller knows it) and an optional
  `verify(path)` callback; a truncated transfer is retried, resuming with an HTTP Range request when the server
  supports it (otherwise it restarts from byte 0);
- retries connection errors, timeouts, 5xx/408/429 with exponential backoff (`backoff * 2**attempt` seconds,
  `backoff` defaults to $NANOCHAT_DOWNLOAD_BACKOFF or 1.0);
- holds `filelock.FileLock(dest + ".lock")` while downloading, so several ranks/processes asking for the same
  file download it once and the others wait, then find it there;
- `hf_dataset_url` honours $HF_ENDPOINT (a mirror), default https://huggingface.co.
"""

import os
import re
import time
from urllib.parse import urlparse

import requests
from filelock import FileLock, Timeout
from tqdm import tqdm

CHUNK_SIZE = 1024 * 1024
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    pass


class _Retryable(Exception):
    """A failed attempt that is worth trying again."""


DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def hf_endpoint():
    """The hub's base URL: $HF_ENDPOINT (a mirror) when set and not empty, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_dataset_url(repo_id, filename, revision="main"):
    """URL of a file in a Hugging Face *dataset* repo, e.g. ("karpathy/climbmix-400b-shuffle", "shard_00000.parquet")."""
    return f"{hf_endpoint()}/datasets/{repo_id}/resolve/{revision}/{filename}"


def hf_auth_headers(url):
    """Send $HF_TOKEN (if set) to the HF endpoint only: higher rate limits, access to gated repos."""
    token = os.environ.get("HF_TOKEN")
    if token and url.startswith(hf_endpoint()):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _default_backoff():
    return float(os.environ.get("NANOCHAT_DOWNLOAD_BACKOFF", "1.0"))


def _content_range_start_total(header):
    # "bytes 100-999/1000" -> (100, 1000); total may be "*"
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    if not match:
        return None, None
    return int(match.group(1)), (None if match.group(2) == "*" else int(match.group(2)))


def _attempt(url, tmp_path, timeout, headers, desc, progress):
    """One HTTP request; appends to / rewrites tmp_path. Returns the expected total size (None if unknown)."""
    have = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
    request_headers = {"Accept-Encoding": "identity", **headers}  # sizes are only checkable without compression
    if have > 0:
        request_headers["Range"] = f"bytes={have}-"
    try:
        response = requests.get(url, stream=True, timeout=timeout, headers=request_headers)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retryable(e) from e
    with response:
        if response.status_code == 416 and have > 0:
            os.remove(tmp_path)  # our partial file does not match the remote file: start over
            raise _Retryable(f"server refused to resume at byte {have} (HTTP 416); restarting")
        if response.status_code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {response.status_code} {response.reason}")
        if response.status_code >= 400:
            raise DownloadError(f"downloading {url} failed: HTTP {response.status_code} {response.reason}. "
                                f"Check that the URL (and HF_ENDPOINT={hf_endpoint()}) is right.")
        if response.status_code == 206:
            start, total = _content_range_start_total(response.headers.get("Content-Range"))
            if start != have:
                os.remove(tmp_path)
                raise _Retryable(f"server resumed at byte {start}, not {have}; restarting")
            mode = "ab"
        else:  # 200: the whole file (a server without Range support also answers like this)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and "Content-Encoding" not in response.headers else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not progress, leave=False)
        try:
            with open(tmp_path, mode) as f:
                for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                    if chunk:
                        f.write(chunk)
                        bar.update(len(chunk))
        except (requests.RequestException, OSError) as e:  # connection dropped mid-body (keep the part we have)
            raise _Retryable(f"transfer interrupted after {os.path.getsize(tmp_path)} bytes: {e}") from e
        finally:
            bar.close()
    return total


def download_file(url, dest_path, desc=None, retries=5, timeout=30, expected_size=None, backoff=None,
                  verify=None, headers=None, progress=True, hint=None):
    """Download url to dest_path (skipped if dest_path exists) and return dest_path.

    retries: attempts in total; backoff: base delay in seconds (sleep backoff * 2**attempt between attempts);
    expected_size: bytes, when known; verify: callable(tmp_path) that raises if the content is bad;
    hint: appended to the error when the host cannot be reached (e.g. "or use --data-dir").
    """
    if os.path.exists(dest_path):
        return dest_path
    backoff = _default_backoff() if backoff is None else backoff
    desc = desc or os.path.basename(dest_path)
    headers = {**hf_auth_headers(url), **(headers or {})}
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
    lock = FileLock(dest_path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another process that is downloading {desc} ...", flush=True)
        lock.acquire()
    try:
        if os.path.exists(dest_path):  # someone else finished it while we waited for the lock
            return dest_path
        tmp_path = dest_path + ".tmp"
        last_error = None
        for attempt in range(1, retries + 1):
            try:
                total = _attempt(url, tmp_path, timeout, headers, desc, progress)
                size = os.path.getsize(tmp_path)
                want = expected_size if expected_size is not None else total
                if want is not None and size != want:
                    if size > want:
                        os.remove(tmp_path)
                    raise _Retryable(f"got {size} bytes, expected {want} (truncated transfer)")
                if verify is not None:
                    try:
                        verify(tmp_path)
                    except Exception as e:
                        os.remove(tmp_path)
                        raise _Retryable(f"downloaded file failed verification: {e}") from e
                os.replace(tmp_path, dest_path)
                return dest_path
            except _Retryable as e:
                last_error = e
                if attempt < retries:
                    wait = backoff * 2 ** attempt
                    print(f"Attempt {attempt}/{retries} for {desc} failed: {e}. Retrying in {wait:g}s", flush=True)
                    time.sleep(wait)
        cause = last_error.__cause__ if last_error is not None else None
        if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
            host = urlparse(url).netloc
            raise DownloadError(
                f"could not reach {host} to download {url} ({retries} attempts; last error: {cause}). "
                f"Check your connection, or set HF_ENDPOINT to a reachable mirror" + (f", {hint}" if hint else "") + "."
            ) from cause
        raise DownloadError(f"downloading {url} failed after {retries} attempts: {last_error}. "
                            f"Run again to resume from the partial {os.path.basename(tmp_path)}.") from last_error
    finally:
        lock.release()
