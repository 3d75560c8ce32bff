"""nanochat.download against a local HTTP server with injected faults (500s, truncated bodies, no Range support)."""
import os
import socket
import threading
import multiprocessing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanochat.download import download_file, hf_dataset_url, DownloadError
from nanochat import download


class FileServer:
    """Serves `files` (path -> bytes). `faults` (path -> list) scripts the answers to successive GETs of a path:
    an int status (e.g. 500), "truncate" (Content-Length of the full answer, then half the body and hang up),
    "ok". Once a path's script is used up, it is served normally. Range requests are honoured when
    support_range is set. Every request is logged as (path, Range header or None, dest existed at that moment)."""

    def __init__(self, files, faults=None, support_range=True, watch=None, delay=0.0):
        self.files, self.faults = files, {k: list(v) for k, v in (faults or {}).items()}
        self.support_range, self.watch, self.delay = support_range, watch, delay
        self.log = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                with server.lock:
                    script = server.faults.get(self.path)
                    action = script.pop(0) if script else "ok"
                    server.log.append((self.path, self.headers.get("Range"),
                                       server.watch is not None and os.path.exists(server.watch)))
                if self.path not in server.files:
                    action = 404
                if isinstance(action, int):
                    self.send_response(action)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files[self.path]
                start = 0
                rng = self.headers.get("Range")
                if rng and server.support_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.delay:
                    import time
                    time.sleep(server.delay)
                if action == "truncate":
                    self.wfile.write(part[:len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def gets(self, path):
        return [entry for entry in self.log if entry[0] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload():
    return os.urandom(3 * 1024 * 1024 + 123)  # a bit over 3 chunks of 1 MB


def test_retries_500s_then_resumes_a_truncated_transfer(tmp_path, payload):
    dest = tmp_path / "out" / "shard.bin"
    server = FileServer({"/f": payload}, faults={"/f": [500, 503, "truncate"]}, watch=str(dest))
    try:
        assert download_file(server.url + "/f", str(dest), backoff=0.001) == str(dest)
    finally:
        server.close()
    assert dest.read_bytes() == payload
    assert not os.path.exists(str(dest) + ".tmp")
    log = server.gets("/f")
    assert len(log) == 4
    assert all(not existed for _, _, existed in log)  # dest never appeared before the download was complete
    # the last request resumed after the bytes kept from the truncated one (whole chunks that arrived)
    resumed_at = int(log[3][1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= len(payload) // 2


def test_restarts_when_the_server_ignores_range(tmp_path, payload):
    dest = tmp_path / "shard.bin"
    server = FileServer({"/f": payload}, faults={"/f": ["truncate", "truncate"]}, support_range=False, watch=str(dest))
    try:
        download_file(server.url + "/f", str(dest), backoff=0.001, progress=False)
    finally:
        server.close()
    assert dest.read_bytes() == payload
    assert len(server.gets("/f")) == 3 and not any(e for _, _, e in server.gets("/f"))


def test_gives_up_without_leaving_anything_at_dest_then_resumes_next_time(tmp_path, payload):
    dest = tmp_path / "shard.bin"
    server = FileServer({"/f": payload}, faults={"/f": ["truncate", 500, 500]})
    try:
        with pytest.raises(DownloadError, match="after 3 attempts"):
            download_file(server.url + "/f", str(dest), retries=3, backoff=0.001)
        assert not dest.exists()
        kept = os.path.getsize(str(dest) + ".tmp")
        assert 0 < kept <= len(payload) // 2  # the partial file is kept, to resume from
        download_file(server.url + "/f", str(dest), retries=3, backoff=0.001)
    finally:
        server.close()
    assert dest.read_bytes() == payload
    assert server.gets("/f")[-1][1] == f"bytes={kept}-"
    assert not os.path.exists(str(dest) + ".tmp")


def test_expected_size_and_verify_failures_are_retried(tmp_path):
    dest = tmp_path / "x.bin"
    calls = []

    def verify(path):
        calls.append(os.path.getsize(path))
        if len(calls) == 1:
            raise ValueError("bad magic")

    server = FileServer({"/x": b"abcdef"})
    try:
        download_file(server.url + "/x", str(dest), backoff=0.001, verify=verify)
        with pytest.raises(DownloadError, match="expected 7"):
            download_file(server.url + "/x", str(tmp_path / "y.bin"), retries=2, backoff=0.001, expected_size=7)
    finally:
        server.close()
    assert dest.read_bytes() == b"abcdef" and calls == [6, 6]
    assert not (tmp_path / "y.bin").exists()


def test_http_404_is_not_retried(tmp_path):
    server = FileServer({})
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_file(server.url + "/missing", str(tmp_path / "m"), backoff=0.001)
    finally:
        server.close()
    assert len(server.log) == 1
    assert not (tmp_path / "m").exists()


def test_unreachable_host_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download_file(f"http://127.0.0.1:{port}/shard", str(tmp_path / "s"), retries=2, backoff=0.001, timeout=2,
                      hint="or use --data-dir")
    message = str(info.value)
    assert f"could not reach 127.0.0.1:{port}" in message and "HF_ENDPOINT" in message and "--data-dir" in message
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.tmp").exists()


def test_existing_file_is_not_downloaded_again(tmp_path):
    dest = tmp_path / "d"
    dest.write_bytes(b"local")
    assert download_file("http://127.0.0.1:9/never", str(dest)) == str(dest)
    assert dest.read_bytes() == b"local"


def _download_in_child(url, dest, queue):
    try:
        queue.put(download_file(url, dest, backoff=0.001, progress=False))
    except Exception as e:  # report, don't hang the parent
        queue.put(repr(e))


def test_concurrent_processes_download_once(tmp_path, payload):
    dest = str(tmp_path / "shared.bin")
    server = FileServer({"/s": payload}, delay=0.3)  # slow enough that all processes ask while it is in flight
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_download_in_child, args=(server.url + "/s", dest, queue)) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        server.close()
    assert results == [dest] * 3
    assert len(server.gets("/s")) == 1
    with open(dest, "rb") as f:
        assert f.read() == payload


def test_hf_dataset_url_honours_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8080/")
    assert hf_dataset_url("karpathy/climbmix-400b-shuffle", "shard_00001.parquet") == \
        "http://127.0.0.1:8080/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00001.parquet"
    monkeypatch.delenv("HF_ENDPOINT")
    assert hf_dataset_url("a/b", "c") == f"{download.DEFAULT_HF_ENDPOINT}/datasets/a/b/resolve/main/c"
