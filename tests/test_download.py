"""nanochat.download against a local HTTP server with injected faults (500s, truncated bodies, no Range support)."""
import os
import socket
import multiprocessing

import pytest

from nanochat.download import download_file, hf_dataset_url, DownloadError
from nanochat import download


@pytest.fixture
def payload():
    return os.urandom(3 * 1024 * 1024 + 123)  # a bit over 3 chunks of 1 MB


def test_retries_500s_then_resumes_a_truncated_transfer(tmp_path, payload, file_server):
    dest = tmp_path / "out" / "shard.bin"
    server = file_server({"/f": payload}, faults={"/f": [500, 503, "truncate"]}, watch=str(dest))
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


def test_restarts_when_the_server_ignores_range(tmp_path, payload, file_server):
    dest = tmp_path / "shard.bin"
    server = file_server({"/f": payload}, faults={"/f": ["truncate", "truncate"]}, support_range=False, watch=str(dest))
    try:
        download_file(server.url + "/f", str(dest), backoff=0.001, progress=False)
    finally:
        server.close()
    assert dest.read_bytes() == payload
    assert len(server.gets("/f")) == 3 and not any(e for _, _, e in server.gets("/f"))


def test_gives_up_without_leaving_anything_at_dest_then_resumes_next_time(tmp_path, payload, file_server):
    dest = tmp_path / "shard.bin"
    server = file_server({"/f": payload}, faults={"/f": ["truncate", 500, 500]})
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


def test_expected_size_and_verify_failures_are_retried(tmp_path, file_server):
    dest = tmp_path / "x.bin"
    calls = []

    def verify(path):
        calls.append(os.path.getsize(path))
        if len(calls) == 1:
            raise ValueError("bad magic")

    server = file_server({"/x": b"abcdef"})
    try:
        download_file(server.url + "/x", str(dest), backoff=0.001, verify=verify)
        with pytest.raises(DownloadError, match="expected 7"):
            download_file(server.url + "/x", str(tmp_path / "y.bin"), retries=2, backoff=0.001, expected_size=7)
    finally:
        server.close()
    assert dest.read_bytes() == b"abcdef" and calls == [6, 6]
    assert not (tmp_path / "y.bin").exists()


def test_http_404_is_not_retried(tmp_path, file_server):
    server = file_server({})
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


def test_concurrent_processes_download_once(tmp_path, payload, file_server):
    dest = str(tmp_path / "shared.bin")
    server = file_server({"/s": payload}, delay=0.3)  # slow enough that all processes ask while it is in flight
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
