"""Deterministic, resumable micro-batches.

`Batches(...).batch(i)` is a pure function of the global micro-batch index i:
epoch = i // len(batches), and the epoch's order is a permutation drawn from a
torch.Generator seeded with (seed, epoch). Resuming a run at step s is just
calling batch(i) from the right i again - no sampler state to save.

Nothing is dropped: the last batch of an epoch may be smaller.

Each batch is a dict of tensors:

    input_ids       (B, T) long   right-padded with pad_id to the longest row
    labels          (B, T) long   input_ids on trained tokens, -100 elsewhere (padding included)
    position_ids    (B, T) long   0, 1, 2, ... restarting at every packed sample
    attention_mask  (B, T) long   1 on real tokens, 0 on padding; None when packing

Labels are not shifted: the trainer predicts labels[:, 1:] from the logits at
[:, :-1], within each row. The first token of every sample gets label -100, so
with packing the last token of one sample is never asked to predict the first
token of the next (and without packing that label was never a target anyway).

Packing (packing=True): samples are packed greedily, in a seeded shuffled order,
into rows of at most max_length tokens. The packing is done once, and each epoch
shuffles the packed rows - so len() is the same every epoch and batch(i) stays
cheap. There is no attention mask: given position_ids that restart at 0 and no
attention_mask, transformers builds a block-diagonal causal mask, so a sample
never attends to the one before it. This detection only runs without a KV cache:
call the model with use_cache=False (its config default is often True).

Several ranks (engine/distributed.py): `shard(rank, world)` makes batch(i) return only
rows rank, rank+world, rank+2·world, ... of global micro-batch i. batch_size stays the
GLOBAL micro-batch size, so the ranks' shards of batch i together are exactly batch i of
a single process, and batch(i) is still a pure function of i.
"""
from __future__ import annotations

import hashlib

import torch

IGNORE = -100


def _generator(seed: int, key) -> torch.Generator:
    # A stable 63-bit seed from (seed, key): different for every epoch, same on every run.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def num_trained_tokens(batch: dict) -> int:
    """Tokens that are targets of the loss (after the shift by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Batches:
    def __init__(self, encoded: list[dict], batch_size: int, seed: int, pad_id: int,
                 packing: bool = False, max_length: int | None = None):
        if not encoded:
            raise ValueError("data: no samples to batch")
        if packing and max_length is None:
            raise ValueError("data: packing needs max_length")
        self.samples = encoded
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.packing = packing
        self.rank, self.world = 0, 1  # see shard()
        if packing:
            self.rows = self._pack(max_length)  # list of rows, each a list of sample indices
        else:
            self.rows = [[i] for i in range(len(encoded))]

    def _pack(self, max_length: int) -> list[list[int]]:
        order = torch.randperm(len(self.samples), generator=_generator(self.seed, "pack")).tolist()
        rows, row, used = [], [], 0
        for i in order:
            n = len(self.samples[i]["input_ids"])
            if n > max_length:
                raise ValueError(f"data: sample {i} has {n} tokens, more than max_length={max_length}")
            if used + n > max_length:  # greedy: close this row when the next sample does not fit
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        rows.append(row)
        return rows

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return -(-len(self.rows) // self.batch_size)

    def shard(self, rank: int, world: int) -> "Batches":
        """From now on batch(i) holds only this rank's rows of global micro-batch i:
        rows rank, rank + world, ... (a ValueError if some rank could get none)."""
        if self.batch_size % world:
            raise ValueError(f"train.batch_size: {self.batch_size} is the global micro-batch size and must be "
                             f"divisible by the {world} ranks")
        last = len(self.rows) % self.batch_size  # rows in the short last micro-batch of an epoch, if any
        if 0 < last < world:
            raise ValueError(f"train.batch_size: the last micro-batch of an epoch has {last} rows "
                             f"({len(self.rows)} rows, batch_size {self.batch_size}), fewer than the {world} ranks; "
                             f"choose a batch_size that leaves no such remainder")
        self.rank, self.world = rank, world
        return self

    def _pick(self, i: int) -> list:
        """This rank's rows of global micro-batch i: slice j of epoch e's seeded permutation, then
        every world-th row from the rank's (all of them in a single process)."""
        epoch, j = divmod(i, len(self))
        order = torch.randperm(len(self.rows), generator=_generator(self.seed, epoch)).tolist()
        rows = [self.rows[r] for r in order[j * self.batch_size:(j + 1) * self.batch_size]]
        return rows[self.rank::self.world]

    def batch(self, i: int) -> dict:
        rows = [[self.samples[s] for s in row] for row in self._pick(i)]
        batch = collate(rows, self.pad_id)
        if self.packing:
            batch["attention_mask"] = None
        return check_trained(batch, i)


def collate(rows: list[list[dict]], pad_id: int) -> dict:
    """Tensors for rows of samples: each row is the concatenation of its samples
    (one sample per row without packing), right-padded with pad_id to the longest row."""
    ids, labels, pos = [], [], []
    for row in rows:
        ids.append([t for s in row for t in s["input_ids"]])
        labels.append([l for s in row for l in [IGNORE] + s["labels"][1:]])
        pos.append([p for s in row for p in range(len(s["input_ids"]))])
    T = max(len(r) for r in ids)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    label_t = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b in range(B):
        n = len(ids[b])
        input_ids[b, :n] = torch.tensor(ids[b])
        label_t[b, :n] = torch.tensor(labels[b])
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.tensor(pos[b])
        # Padding positions count on from 0, as a sample of their own: with packing
        # that keeps them out of the last real sample's block.
        position_ids[b, n:] = torch.arange(T - n)
    return {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids,
            "attention_mask": attention_mask}


def check_trained(batch: dict, i: int) -> dict:
    """The batch, or an error if no label in it is a target (its loss would be 0/0)."""
    if num_trained_tokens(batch) == 0:
        raise ValueError(f"data: batch {i} has no trained tokens (every label is -100)")
    return batch
