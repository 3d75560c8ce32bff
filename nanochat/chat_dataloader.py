"""
SFT's data loader: conversations rendered with their loss masks and packed into fixed-size (B, T) rows, with an
exact resume state.
"""

import torch


class ConversationPacker:
    """
    Yields (inputs, targets) of shape (B, T). Every row starts at the <|bos|> of a conversation; the largest
    buffered conversation that still fits is added until none does, then the rest of the row is padded
    (packing="pad", nothing is ever cropped) or filled with the start of the oldest buffered one ("crop").
    Targets are -1 where the render mask is 0 (user turns, tool outputs, padding) when loss_on="assistant".
    Conversations longer than T+1 tokens are truncated to T+1 when rendered, so every one fits a row.

    Rank r reads conversations r, r+W, r+2W, ... With stop_at_epoch_end, each conversation is used exactly
    once and `exhausted` turns True once the last one is packed (later batches are all padding); otherwise
    the data loops over epochs. state_dict() / resume_state restore the exact stream (the buffered
    conversations are re-rendered from their indices).
    """

    def __init__(self, dataset, tokenizer, batch_size, seq_len, device, rank=0, world_size=1, packing="pad",
                 loss_on="assistant", stop_at_epoch_end=False, buffer_size=100, resume_state=None):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T = batch_size, seq_len
        self.device = device
        self.world_size = world_size
        self.packing, self.loss_on = packing, loss_on
        self.stop_at_epoch_end = stop_at_epoch_end
        self.buffer_size = buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch, self.consumed = rank, 1, 0
        self.buffer = []  # (dataset index, ids, mask)
        if resume_state is not None:
            self.cursor, self.epoch, self.consumed = resume_state["cursor"], resume_state["epoch"], resume_state["consumed"]
            self.buffer = [self._render(i) for i in resume_state["buffer"]]

    def state_dict(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "buffer": [i for i, _, _ in self.buffer]}

    @property
    def exhausted(self):
        return self.stop_at_epoch_end and self.cursor >= len(self.dataset) and not self.buffer

    @property
    def progress(self):
        """Fraction of one epoch consumed (all ranks together, assuming they move in step)."""
        return self.consumed * self.world_size / len(self.dataset)

    def _render(self, index):
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.T + 1)
        if self.loss_on == "all":
            mask = [0] + [1] * (len(ids) - 1)  # every next token (the leading <|bos|> is never a target)
        return index, ids, mask

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= len(self.dataset):
                if self.stop_at_epoch_end:
                    return
                self.cursor %= len(self.dataset)
                self.epoch += 1
            self.buffer.append(self._render(self.cursor))
            self.cursor += self.world_size

    def _take(self, i):
        self.consumed += 1
        return self.buffer.pop(i)

    def next_rows(self):
        """Lists of (ids, mask) rows of exactly T+1 tokens."""
        capacity = self.T + 1
        rows = []
        for _ in range(self.B):
            ids, mask = [], []
            while len(ids) < capacity:
                self._refill()
                if not self.buffer:
                    break  # end of the epoch: pad the rest
                remaining = capacity - len(ids)
                best = max((k for k in range(len(self.buffer)) if len(self.buffer[k][1]) <= remaining),
                           key=lambda k: len(self.buffer[k][1]), default=None)
                if best is not None:
                    _, conv_ids, conv_mask = self._take(best)
                    ids += conv_ids
                    mask += conv_mask
                elif self.packing == "crop":
                    _, conv_ids, conv_mask = self._take(0)
                    ids += conv_ids[:remaining]
                    mask += conv_mask[:remaining]
                else:
                    break
            pad = capacity - len(ids)
            rows.append((ids + [self.bos] * pad, mask + [0] * pad))
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = self.next_rows()
        ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
        mask = torch.tensor([m for _, m in rows], dtype=torch.bool)
        inputs = ids[:, :-1]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        use_cuda = self.device.type == "cuda" if isinstance(self.device, torch.device) else str(self.device).startswith("cuda")
        if use_cuda:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return (inputs.to(self.device, non_blocking=use_cuda).contiguous(),
                targets.to(self.device, non_blocking=use_cuda).contiguous())
