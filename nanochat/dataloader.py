"""
Distributed pretraining data loader: BOS-aligned best-fit packing, with exact resume.

Packing (nanochat's algorithm, same choices):
- every row holds T+1 tokens and starts with BOS (each document is tokenized with BOS prepended);
- keep at least `buffer_size` tokenized documents buffered; fill a row by repeatedly taking the *largest*
  buffered document that fits entirely in the space left (the earliest buffered one among equal lengths);
- when none fits, take the *shortest* buffered document and crop it to fill the row exactly (its tail is dropped);
- no padding: every position is a real token; inputs = row[:-1], targets = row[1:] (int64).
The buffer is kept indexed by length (a sorted list of lengths + a FIFO per length), so each choice is
O(log n) instead of nanochat's scan over the whole buffer; the choices are identical.

Distribution: inside each file, units (parquet row groups) are strided by rank: rank r reads units
r, r+world, r+2*world, ... Files are read in order, forever; `epoch` counts passes (starting at 1).

State and exact resume: each yield comes with a state dict
    {"pq_idx", "rg_idx", "epoch"}   the unit the last tokenized batch came from (nanochat's keys and meaning),
    "row"                           how many documents of that unit have been read,
    "buffer"                        [[pq_idx, rg_idx, row], ...] the documents still buffered, in buffer order,
    "rank", "world_size"
A loader given this state re-reads and re-tokenizes just the buffered documents and continues reading at the
saved position, so it yields exactly the batches the uninterrupted loader would have (given the same data,
tokenizer, B, T, buffer_size and tokenizer_batch_size, which decide what gets packed). Note that the state is
per rank: to resume a multi-rank run exactly, save every rank's state (e.g. all_gather_object at save time)
and pass either this rank's state or the list of all ranks' states (the loader picks its own). A state with
only nanochat's three keys
(or one saved by another rank / world size) resumes approximately as nanochat does: at the next unit of this
rank after the saved one, with an empty buffer.

Device transfer: rows are built on the CPU, copied into a pinned staging buffer, and moved with one
non-blocking copy into a persistent device buffer. Two staging/device buffer pairs alternate, and a CUDA event
guards each staging buffer, so a batch is never overwritten while its copy is still in flight (nanochat reuses
one pinned buffer without waiting). A yielded batch stays intact while the next one is drawn; the one after
that reuses its memory.
"""

import bisect
from collections import deque

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import split_parts, read_row_group


def _document_batches(parts, rank, world_size, position, batch_size):
    """Infinite stream of (docs, (pq_idx, rg_idx, row, epoch)) for this rank, starting at position =
    (pq_idx, rg_idx, row, epoch): the next unread document. row is the index of docs[0] in its unit."""
    pq_idx, rg_idx, row, epoch = position
    while True:
        docs_this_pass = 0
        while pq_idx < len(parts):
            path, units = parts[pq_idx]
            while rg_idx < len(units):
                docs = read_row_group(path, units[rg_idx])
                for i in range(row, len(docs), batch_size):
                    docs_this_pass += 1
                    yield docs[i:i + batch_size], (pq_idx, rg_idx, i, epoch)
                row = 0
                rg_idx += world_size
            pq_idx, rg_idx, row = pq_idx + 1, rank, 0
        if docs_this_pass == 0 and position == (0, rank, 0, epoch):
            raise ValueError("the data split has no documents for this rank (all its units are empty)")
        pq_idx, rg_idx, row, epoch = 0, rank, 0, epoch + 1
        position = (0, rank, 0, epoch)


class _BestFitBuffer:
    """Tokenized documents in arrival order, indexed by length for best-fit choices."""

    def __init__(self):
        self.lengths = []   # sorted distinct lengths present
        self.by_length = {}  # length -> deque of (seq, tokens), oldest first
        self.live = {}       # seq -> coord of every buffered document; dicts keep insertion order
        self.count = 0
        self.seq = 0

    def add(self, tokens, coord):
        n = len(tokens)
        queue = self.by_length.get(n)
        if queue is None:
            queue = self.by_length[n] = deque()
            bisect.insort(self.lengths, n)
        queue.append((self.seq, tokens))
        self.live[self.seq] = coord
        self.seq += 1
        self.count += 1

    def _pop(self, n):
        queue = self.by_length[n]
        seq, tokens = queue.popleft()
        del self.live[seq]
        if not queue:
            del self.by_length[n]
            self.lengths.pop(bisect.bisect_left(self.lengths, n))
        self.count -= 1
        return tokens

    def pop_largest_fitting(self, space):
        """The longest document with len <= space (earliest among equals), or None."""
        i = bisect.bisect_right(self.lengths, space) - 1
        return self._pop(self.lengths[i]) if i >= 0 else None

    def pop_shortest(self):
        return self._pop(self.lengths[0])

    def coords(self):
        """Coordinates of the buffered documents, in arrival order."""
        return list(self.live.values())


def _read_docs_at(parts, coords):
    """The documents at [pq_idx, rg_idx, row] coordinates, in the given order (each unit is read once)."""
    cache = {}
    docs = []
    for pq_idx, rg_idx, row in coords:
        key = (pq_idx, rg_idx)
        if key not in cache:
            if not (0 <= pq_idx < len(parts) and 0 <= rg_idx < len(parts[pq_idx][1])):
                raise ValueError(f"loader state points at file {pq_idx} unit {rg_idx}, which this data does not "
                                 f"have: the data changed since the state was saved")
            path, units = parts[pq_idx]
            cache = {key: read_row_group(path, units[rg_idx])}  # coords come in stream order: keep one unit
        unit = cache[key]
        if row >= len(unit):
            raise ValueError(f"loader state points at document {row} of file {pq_idx} unit {rg_idx}, which has only "
                             f"{len(unit)}: the data changed since the state was saved")
        docs.append(unit[row])
    return docs


def _resume_position(state, parts, rank, world_size):
    """(position, buffered coords) to start from, exact when the state allows it."""
    if state is None:
        return (0, rank, 0, 1), []
    if isinstance(state, (list, tuple)):  # every rank's state, saved together
        state = state[rank] if len(state) == world_size else state[0]
    exact = ("buffer" in state and "row" in state and state.get("rank", rank) == rank
             and state.get("world_size", world_size) == world_size)
    if exact:
        return (state["pq_idx"], state["rg_idx"], state["row"], state["epoch"]), [tuple(c) for c in state["buffer"]]
    why = ("it has no buffer contents (a nanochat-style state)" if "buffer" not in state else
           f"it was saved by rank {state.get('rank')} of {state.get('world_size')}, this is rank {rank} of {world_size}")
    print(f"Note: rank {rank} resumes the data loader approximately because {why}: it skips to its next unit after "
          f"file {state['pq_idx']} unit {state['rg_idx']}; documents buffered at save time are not replayed.", flush=True)
    pq_idx, rg_idx = state["pq_idx"], state["rg_idx"]
    rg_idx = (rg_idx // world_size + 1) * world_size + rank  # nanochat: advance by one stride, don't repeat data
    return (pq_idx, rg_idx, 0, state.get("epoch", 1)), []


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, device="cuda", resume_state_dict=None, data_dir=None, buffer_size=1000,
        tokenizer_threads=4, tokenizer_batch_size=128):
    """Infinite generator of (inputs (B,T) int64, targets (B,T) int64, state_dict) on `device`."""
    assert split in ("train", "val"), "split must be 'train' or 'val'"
    assert B > 0 and T > 0 and buffer_size > 0 and tokenizer_batch_size > 0
    ddp, rank, local_rank, world_size = get_dist_info()
    parts = split_parts(split, data_dir, warn_on_legacy=(rank == 0 and split == "train"))
    units_here = sum(len(range(rank, len(units), world_size)) for _, units in parts)
    if units_here == 0:
        total = sum(len(units) for _, units in parts)
        raise ValueError(f"the {split} split has {total} unit(s) of documents (parquet row groups) across "
                         f"{len(parts)} file(s), fewer than the {world_size} ranks, so rank {rank} gets none. "
                         f"Use more data (or smaller row groups) or fewer ranks.")
    bos = tokenizer.get_bos_token_id()
    row_capacity = T + 1

    position, buffered_coords = _resume_position(resume_state_dict, parts, rank, world_size)
    batches = _document_batches(parts, rank, world_size, position, tokenizer_batch_size)
    buffer = _BestFitBuffer()
    last = {"pq_idx": position[0], "rg_idx": position[1], "row": position[2], "epoch": position[3]}

    for i in range(0, len(buffered_coords), tokenizer_batch_size):
        coords = buffered_coords[i:i + tokenizer_batch_size]
        token_lists = tokenizer.encode(_read_docs_at(parts, coords), prepend=bos, num_threads=tokenizer_threads)
        for tokens, coord in zip(token_lists, coords):
            buffer.add(tokens, coord)

    def refill():
        docs, (pq_idx, rg_idx, row, epoch) = next(batches)
        token_lists = tokenizer.encode(docs, prepend=bos, num_threads=tokenizer_threads)
        for j, tokens in enumerate(token_lists):
            buffer.add(tokens, (pq_idx, rg_idx, row + j))
        last.update(pq_idx=pq_idx, rg_idx=rg_idx, row=row + len(docs), epoch=epoch)

    device = torch.device(device)
    use_cuda = device.type == "cuda"
    rows = np.empty((B, row_capacity), dtype=np.int64)
    staging = [torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda) for _ in range(2)]
    on_device = staging if device.type == "cpu" else [torch.empty(2 * B * T, dtype=torch.long, device=device)
                                                      for _ in range(2)]
    copied = [torch.cuda.Event() for _ in range(2)] if use_cuda else None
    # numpy views of the staging buffers: np.copyto of the shifted rows is orders of magnitude faster than
    # torch's strided copy_ here (dev/PERF.md, "Data loading")
    staged = [(s.numpy()[:B * T].reshape(B, T), s.numpy()[B * T:].reshape(B, T)) for s in staging]
    step = 0
    while True:
        for r in range(B):
            pos = 0
            while pos < row_capacity:
                while buffer.count < buffer_size:
                    refill()
                space = row_capacity - pos
                tokens = buffer.pop_largest_fitting(space)
                if tokens is None:  # nothing fits: crop the shortest document to fill the row exactly
                    tokens = buffer.pop_shortest()[:space]
                rows[r, pos:pos + len(tokens)] = tokens
                pos += len(tokens)
        slot = step % 2
        step += 1
        if use_cuda:
            copied[slot].synchronize()  # the copy out of this staging buffer two batches ago has finished
        np.copyto(staged[slot][0], rows[:, :-1])
        np.copyto(staged[slot][1], rows[:, 1:])
        if on_device is not staging:
            on_device[slot].copy_(staging[slot], non_blocking=use_cuda)
            if use_cuda:
                copied[slot].record()
        state_dict = {"pq_idx": last["pq_idx"], "rg_idx": last["rg_idx"], "epoch": last["epoch"], "row": last["row"],
                      "buffer": buffer.coords(), "rank": rank, "world_size": world_size}
        yield on_device[slot][:B * T].view(B, T), on_device[slot][B * T:].view(B, T), state_dict


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same batches, without the state dict."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
