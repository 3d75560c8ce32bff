"""nanochat.dataloader: BOS-aligned best-fit packing vs a plain re-statement, exact resume, DDP striding."""
import os
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import nanochat.dataloader as dataloader_module
from nanochat.dataloader import (tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_with_state,
                                 tokenizing_distributed_data_loader_bos_bestfit)

B, T = 3, 32
SMALL = dict(buffer_size=8, tokenizer_batch_size=4, tokenizer_threads=1)


@pytest.fixture
def data_dir(tmp_path):
    """3 train files of 3-4 row groups of 10 docs (lengths 1..120 bytes, some longer than a row) + 1 val file."""
    rng = random.Random(0)
    root = tmp_path / "data"
    os.makedirs(root)
    for f, num_docs in enumerate([30, 35, 25, 20]):
        docs = [f"<{f}.{i}>" + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 120)))
                for i in range(num_docs)]
        pq.write_table(pa.table({"text": docs}), str(root / f"part_{f}.parquet"), row_group_size=10)
    return str(root)


def read_stream(data_dir, rank, world_size, batch_size, epochs):
    """The documents in the order a rank should read them, straight from pyarrow: per epoch, per train file,
    row groups rank, rank+world, ..., in tokenizer batches of batch_size."""
    files = sorted(os.listdir(data_dir))[:-1]
    for _ in range(epochs):
        for name in files:
            pf = pq.ParquetFile(os.path.join(data_dir, name))
            for rg in range(rank, pf.num_row_groups, world_size):
                docs = pf.read_row_group(rg).column("text").to_pylist()
                for i in range(0, len(docs), batch_size):
                    yield docs[i:i + batch_size]


def reference_batches(tok, data_dir, num_batches, rank=0, world_size=1, buffer_size=8, batch_size=4):
    """A plain re-statement of nanochat's best-fit packing (list buffer, linear scans)."""
    stream = read_stream(data_dir, rank, world_size, batch_size, epochs=100)
    buffer, batches = [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(tok.encode(next(stream), prepend=tok.get_bos_token_id()))
                space = T + 1 - len(row)
                fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
                if fitting:  # largest that fits; earliest among equals
                    i = max(fitting, key=lambda i: (len(buffer[i]), -i))
                    row += buffer.pop(i)
                else:  # crop the shortest (earliest among equals) to fill the row
                    i = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                    row += buffer.pop(i)[:space]
            rows.append(row)
        batches.append(torch.tensor(rows))
    return batches


def take(loader, n):
    out = []
    for _ in range(n):
        x, y, state = next(loader)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(state))))  # the state must survive JSON (meta)
    return out


def fake_dist(monkeypatch, rank, world_size):
    monkeypatch.setattr(dataloader_module, "get_dist_info", lambda: (world_size > 1, rank, rank, world_size))


def test_rows_are_bos_aligned_full_and_made_of_real_documents(data_dir, byte_tokenizer):
    bos = byte_tokenizer.get_bos_token_id()
    all_docs = [d.encode() for name in sorted(os.listdir(data_dir))
                for d in pq.read_table(os.path.join(data_dir, name)).column("text").to_pylist()]
    for x, y, _ in take(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir, **SMALL), 40):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        rows = torch.cat([x, y[:, -1:]], dim=1)
        for row in rows.tolist():
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            segments = [bytes(row[a + 1:b]) for a, b in zip(starts, starts[1:])]
            for k, seg in enumerate(segments):
                if k < len(segments) - 1:
                    assert seg in all_docs  # whole documents, only the last one may be cropped
                else:
                    assert any(d.startswith(seg) for d in all_docs)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_packing_matches_a_plain_restatement_of_best_fit(data_dir, monkeypatch, rank, world_size, byte_tokenizer):
    fake_dist(monkeypatch, rank, world_size)
    got = take(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir, **SMALL), 60)
    want = reference_batches(byte_tokenizer, data_dir, 60, rank, world_size)
    for (x, y, _), rows in zip(got, want):
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert got[-1][2]["epoch"] >= 2  # the run wrapped around the data at least once


def test_resume_yields_exactly_the_uninterrupted_batches(data_dir, byte_tokenizer):
    def make(state=None):
        return loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir,
                                 resume_state_dict=state, **SMALL)

    full = take(make(), 70)
    m = 8
    crossed_file = crossed_epoch = False
    for k in range(0, 62, 3):
        state = full[k][2]
        resumed = take(make(state), m)
        for (x, y, s), (rx, ry, rs) in zip(full[k + 1:k + 1 + m], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)
            assert s == rs
        after = full[k + m][2]
        crossed_file |= (after["epoch"], after["pq_idx"]) != (state["epoch"], state["pq_idx"])
        crossed_epoch |= after["epoch"] != state["epoch"]
    assert crossed_file and crossed_epoch  # resumed windows spanned a file boundary and an epoch wrap


def test_nanochat_style_state_resumes_approximately_at_the_next_row_group(data_dir, capsys, byte_tokenizer):
    loader = loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir,
                               resume_state_dict={"pq_idx": 1, "rg_idx": 1, "epoch": 3}, **SMALL)
    _, _, state = next(loader)
    assert "approximately" in capsys.readouterr().out
    assert state["epoch"] == 3
    assert all((pq_idx, rg_idx) >= (1, 2) for pq_idx, rg_idx, _ in state["buffer"])


def test_state_of_another_rank_falls_back_to_approximate(data_dir, monkeypatch, capsys, byte_tokenizer):
    state = take(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir, **SMALL), 5)[-1][2]
    fake_dist(monkeypatch, 1, 2)
    _, _, resumed = next(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir,
                                           resume_state_dict=state, **SMALL))
    assert "saved by rank 0 of 1, this is rank 1 of 2" in capsys.readouterr().out
    assert all(rg_idx % 2 == 1 for _, rg_idx, _ in resumed["buffer"])


def test_each_rank_picks_its_own_state_from_a_list_of_all_ranks_states(data_dir, monkeypatch, byte_tokenizer):
    def run(rank, n, state=None):
        fake_dist(monkeypatch, rank, 2)
        return take(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir,
                                      resume_state_dict=state, **SMALL), n)

    full = [run(rank, 12) for rank in range(2)]
    states = [full[rank][5][2] for rank in range(2)]
    for rank in range(2):
        resumed = run(rank, 6, states)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full[rank][6:], resumed))


def test_ranks_read_disjoint_row_groups_covering_the_split(data_dir, monkeypatch, byte_tokenizer):
    real_read = dataloader_module.read_row_group
    seen = {}
    for rank in range(2):
        reads = []

        def recording_read(path, unit, reads=reads):
            reads.append((os.path.basename(path), unit))
            return real_read(path, unit)

        monkeypatch.setattr(dataloader_module, "read_row_group", recording_read)
        fake_dist(monkeypatch, rank, 2)
        loader = loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir, **SMALL)
        while next(loader)[2]["epoch"] == 1:
            pass
        seen[rank] = reads[:reads.index(reads[0], 1)]  # one pass, up to where it starts over
    all_units = {(name, rg) for name in sorted(os.listdir(data_dir))[:-1]
                 for rg in range(pq.ParquetFile(os.path.join(data_dir, name)).num_row_groups)}
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == all_units
    assert all(rg % 2 == rank for rank in range(2) for _, rg in seen[rank])


def test_too_many_ranks_for_the_val_split_is_a_clear_error(data_dir, monkeypatch, byte_tokenizer):
    fake_dist(monkeypatch, 3, 4)  # the val file has 2 row groups
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        next(tokenizing_distributed_data_loader_bos_bestfit(byte_tokenizer, B, T, "val", device="cpu",
                                                            data_dir=data_dir))


def test_jsonl_folder_feeds_the_loader(tmp_path, byte_tokenizer):
    bos = byte_tokenizer.get_bos_token_id()
    root = tmp_path / "j"
    os.makedirs(root)
    for name in ("a.jsonl", "b.jsonl"):
        (root / name).write_text("".join(json.dumps({"text": f"{name} document {i}"}) + "\n" for i in range(50)))
    x, y = next(tokenizing_distributed_data_loader_bos_bestfit(byte_tokenizer, 2, 16, "val", device="cpu",
                                                               data_dir=str(root), buffer_size=4))
    assert (x[:, 0] == bos).all() and b"b.jsonl" in bytes(t for t in x[0].tolist() if t != bos)


@pytest.mark.cuda
def test_cuda_batches_equal_cpu_batches_and_stay_valid_for_one_more_batch(data_dir, byte_tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = take(loader_with_state(byte_tokenizer, B, T, "train", device="cpu", data_dir=data_dir, **SMALL), 20)
    gpu = loader_with_state(byte_tokenizer, B, T, "train", device="cuda", data_dir=data_dir, **SMALL)
    previous = None
    for x_cpu, y_cpu, _ in cpu:
        x, y, _ = next(gpu)
        assert x.is_cuda and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
        if previous is not None:  # the batch before is still intact after drawing this one
            assert torch.equal(previous[0].cpu(), previous[1])
        previous = (x, x_cpu)
