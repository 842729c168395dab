"""Rows, micro-batches and the resumable order they come in.

A *row* is one line of a batch: a single example, or with packing several examples laid end to end in at
most max_seq_len tokens. Each epoch's order of micro-batches is a pure function of (seed, epoch), so a
`DataPosition` (epoch, micro-batches already taken) is enough to resume exactly where a run stopped.
"""

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from qtune.data.render import IGNORE

# Length grouping sorts within windows of this many micro-batches (as Hugging Face's LengthGroupedSampler):
# big enough to find similar lengths, small enough that batches still mix the data.
MEGA_BATCH_MULT = 50


@dataclass(frozen=True)
class DataPosition:
    """Where the batch stream is: `index` micro-batches of epoch `epoch` have been taken."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["index"]))


def pack_rows(lengths: np.ndarray, max_seq_len: int) -> list[list[int]]:
    """Greedy bin packing of example indices into rows of at most max_seq_len tokens.

    Best-fit decreasing: longest example first, each into the row whose free space fits it most tightly
    (a new row when none fits). Deterministic; keeps `free` sorted so each placement is a binary search.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), ascending
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([int(i)])
            space, r = max_seq_len - n, len(rows) - 1
        else:
            space, r = free.pop(k)
            rows[r].append(int(i))
            space -= n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


def epoch_batches(row_lengths: np.ndarray, micro_batch_size: int, seed: int, epoch: int, shuffle: bool,
                  group_by_length: bool) -> list[np.ndarray]:
    """The micro-batches (arrays of row indices) of one epoch, determined by (seed, epoch) alone.

    Length grouping: shuffle, sort by length within mega-batches of MEGA_BATCH_MULT micro-batches, cut into
    micro-batches, shuffle those, and put the longest first so that running out of memory shows at step one.
    """
    n = len(row_lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        mega = micro_batch_size * MEGA_BATCH_MULT
        chunks = [order[i:i + mega] for i in range(0, n, mega)]
        order = np.concatenate([c[np.argsort(-row_lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + micro_batch_size] for i in range(0, n, micro_batch_size)]
    if group_by_length and shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda k: row_lengths[batches[k]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def collate(rows: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> right-padded LongTensors (B, T).

    attention_mask holds segment ids: 0 for padding, 1, 2, 3... for the examples of a packed row, so the model
    lets a token attend only to earlier tokens of its own example. position_ids restart at 0 in each example.
    """
    B, T = len(rows), max(sum(len(ex.input_ids) for ex in row) for row in rows)
    input_ids = np.full((B, T), pad_id, np.int64)
    labels = np.full((B, T), IGNORE, np.int64)
    segments = np.zeros((B, T), np.int64)
    positions = np.zeros((B, T), np.int64)
    for b, row in enumerate(rows):
        t = 0
        for segment, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = ex.input_ids
            labels[b, t:t + n] = ex.labels
            segments[b, t:t + n] = segment
            positions[b, t:t + n] = np.arange(n)
            t += n
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(segments), "position_ids": torch.from_numpy(positions)}
