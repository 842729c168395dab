"""The SFT data pipeline: sources -> tokenized examples -> validation split -> mixture -> rows -> batches.

    data = build_sft_data(recipe.data, tokenizer, seed=recipe.train.seed)
    for position, batch in data.batches(micro_batch_size, seed, start=saved_position):
        ...  # batch: input_ids, labels, attention_mask (segment ids), position_ids, each (B, T)

Everything random is drawn from numpy generators seeded by (seed, purpose, source), so the same recipe and
seed give the same split, mixture, packing and batch order on every machine.
"""

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qtune.data.batching import DataPosition, collate, epoch_batches, pack_rows
from qtune.data.records import DataError, load_records
from qtune.data.tokenized import Example, TokenizedSet, tokenize_cached

# Separate random streams, so that e.g. changing the mixture does not change the validation split.
_SPLIT_STREAM, _MIX_STREAM, _PRETRAIN_STREAM = 0, 1, 2


def proportional_counts(total: int, sizes: list[int]) -> list[int]:
    """Split `total` in proportion to `sizes` into integers that sum to `total` (largest remainders)."""
    exact = np.asarray(sizes, float) * total / max(1, sum(sizes))
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def mixture_counts(sizes: list[int], weights: list[float], caps: list[int]) -> list[int]:
    """Examples-proportional mixing with a cap K (Raffel et al. 2020, T5 section 3.5.2; used by FLAN).

    Source i contributes m_i = round(w_i * min(n_i, K_i)) examples per epoch (K_i = 0: no cap), so its sampling
    rate r_i = m_i / sum_j m_j is proportional to w_i * min(n_i, K_i).
    """
    return [max(1, round(w * (min(n, k) if k else n))) for n, w, k in zip(sizes, weights, caps)]


def sample_indices(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """`m` indices into `n` examples: whole shuffled passes, then a random subset without repeats."""
    full, rest = divmod(m, n)
    return np.concatenate([rng.permutation(n) for _ in range(full)] + [rng.permutation(n)[:rest]]).astype(np.int64)


@dataclass
class SFTData:
    """Training and validation examples plus the rows (packed or not) the training batches are cut from."""

    train: list[Example]
    val: list[Example]
    rows: list[list[int]]  # each training row: indices into `train` (one index unless packing)
    stats: dict
    pad_id: int
    shuffle: bool = True
    group_by_length: bool = True
    row_lengths: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        lengths = np.array([len(ex.input_ids) for ex in self.train], np.int64)
        self.row_lengths = np.array([lengths[row].sum() for row in self.rows], np.int64)

    def batches_per_epoch(self, micro_batch_size: int) -> int:
        return -(-len(self.rows) // micro_batch_size)

    def batches(self, micro_batch_size: int, seed: int, start: DataPosition = DataPosition()
                ) -> Iterator[tuple[DataPosition, dict]]:
        """Endless training micro-batches from `start`, epoch after epoch.

        Yields (position, batch) where `position` is the place just after `batch`: save it with a checkpoint
        and pass it back as `start` to continue with the next batch. `position.epoch` counts finished epochs.
        """
        epoch, first = start.epoch, start.index
        while True:
            plan = epoch_batches(self.row_lengths, micro_batch_size, seed, epoch, self.shuffle, self.group_by_length)
            if first > len(plan):
                raise ValueError(f"data position {start} is past the end of epoch {epoch} ({len(plan)} micro-batches); "
                                 "the checkpoint was made with different data or micro_batch_size")
            for k in range(first, len(plan)):
                rows = [[self.train[i] for i in self.rows[r]] for r in plan[k]]
                after = DataPosition(epoch, k + 1) if k + 1 < len(plan) else DataPosition(epoch + 1, 0)
                yield after, collate(rows, self.pad_id)
            epoch, first = epoch + 1, 0

    def val_batches(self, micro_batch_size: int) -> Iterator[dict]:
        """Validation micro-batches in a fixed order, one example per row."""
        for i in range(0, len(self.val), micro_batch_size):
            yield collate([[ex] for ex in self.val[i:i + micro_batch_size]], self.pad_id)


def _validation_counts(data, sizes: list[int]) -> list[int]:
    if data.val_size > 0:
        counts = proportional_counts(data.val_size, sizes)
    else:
        counts = [round(data.val_fraction * n) for n in sizes]
    for n, k, src in zip(sizes, counts, data.source_list()):
        if k >= n:
            raise DataError(f"{src.path}: holding out {k} validation examples leaves none of its {n} for training; "
                            "lower data.val_size / data.val_fraction")
    return counts


def _pretrain_examples(data, tokenizer, n_sft: int, seed: int) -> tuple[list[Example], dict | None]:
    """Plain-text examples making up `pretrain_fraction` of the training set: P / (n_sft + P) = f."""
    if not data.pretrain_path:
        return [], None
    records = load_records(data.pretrain_path, data.split)
    store = tokenize_cached(records, "text", tokenizer, data.max_seq_len, True, data.cache_dir, chunk=True)
    f = data.pretrain_fraction
    count = max(1, round(n_sft * f / (1 - f)))
    picks = sample_indices(len(store), count, np.random.default_rng([seed, _PRETRAIN_STREAM]))
    return [store.example(i) for i in picks], {**store.stats, "cached": store.from_cache, "train": count}


def build_sft_data(data, tokenizer, seed: int) -> SFTData:
    """Load, tokenize (cached), split, mix and pack the data of an `[data]` recipe section (SFTDataSection)."""
    sources = data.source_list()
    stores: list[TokenizedSet] = []
    for src in sources:
        records = load_records(src.path, src.split)
        stores.append(tokenize_cached(records, src.format, tokenizer, data.max_seq_len, data.train_on_input,
                                      data.cache_dir))
    val_counts = _validation_counts(data, [len(s) for s in stores])
    train_parts, val, source_stats = [], [], []
    for k, (src, store, n_val) in enumerate(zip(sources, stores, val_counts)):
        perm = np.random.default_rng([seed, _SPLIT_STREAM, k]).permutation(len(store))
        val += [store.example(i) for i in np.sort(perm[:n_val])]
        train_parts.append(np.sort(perm[n_val:]))
    counts = mixture_counts([len(p) for p in train_parts], [s.weight for s in sources],
                            [s.max_examples for s in sources])
    train = []
    for k, (src, store, part, m) in enumerate(zip(sources, stores, train_parts, counts)):
        picks = part[sample_indices(len(part), m, np.random.default_rng([seed, _MIX_STREAM, k]))]
        train += [store.example(i) for i in np.sort(picks)]
        source_stats.append({**store.stats, "cached": store.from_cache, "train": m, "val": val_counts[k],
                             "weight": src.weight, "max_examples": src.max_examples})
    pretrain, pretrain_stats = _pretrain_examples(data, tokenizer, len(train), seed)
    train += pretrain
    lengths = np.array([len(ex.input_ids) for ex in train], np.int64)
    rows = pack_rows(lengths, data.max_seq_len) if data.packing else [[i] for i in range(len(train))]
    stats = {
        "sources": source_stats, "pretrain": pretrain_stats,
        "train_examples": len(train), "val_examples": len(val), "train_rows": len(rows),
        "train_tokens": int(lengths.sum()),
        "trained_tokens": int(sum(int((ex.labels != -100).sum()) for ex in train)),
        "truncated": sum(s["truncated"] for s in source_stats), "dropped": sum(s["dropped"] for s in source_stats),
    }
    if data.packing:
        stats["row_fill"] = stats["train_tokens"] / (len(rows) * data.max_seq_len)
    return SFTData(train, val, rows, stats, tokenizer.pad_id, data.shuffle, data.group_by_length)
