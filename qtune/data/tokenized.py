"""The tokenized examples of one data source, stored flat and cached on disk.

A source's examples are three arrays: every example's input ids end to end, the labels likewise, and the
offsets where each example starts. The cache writes them as .npy files (read back with
allow_pickle=False) plus a JSON file of statistics. The cache key hashes the data's content, the tokenizer's
files and every setting that changes the tokens, so a stale entry is never read; an entry is written to a
temporary directory and renamed into place, so an interrupted write leaves nothing behind.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qtune.data.records import DataError, Records
from qtune.data.render import detect_format, finish_example, tokenize_record

# Bump when the rendering or storage changes, so that old cache entries stop matching.
CACHE_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


class Example(NamedTuple):
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, -100 where no loss is taken


@dataclass
class TokenizedSet:
    input_ids: np.ndarray  # (N,) int32, all examples end to end
    labels: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (n + 1,) int64: example i is input_ids[offsets[i]:offsets[i + 1]]
    stats: dict  # name, format, records, examples, truncated, dropped, tokens, trained_tokens
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> Example:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Example(self.input_ids[a:b], self.labels[a:b])

    def save(self, directory: Path) -> None:
        """Write atomically: a temporary sibling directory renamed to `directory` once complete."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
        for name in ("input_ids", "labels", "offsets"):
            np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)
        (tmp / "stats.json").write_text(json.dumps(self.stats, indent=1))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "TokenizedSet":
        arrays = [np.load(directory / f"{name}.npy", allow_pickle=False) for name in ("input_ids", "labels", "offsets")]
        return cls(*arrays, json.loads((directory / "stats.json").read_text()), from_cache=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's files (plus its special ids), so a changed tokenizer misses the cache."""
    h = hashlib.sha256()
    model_dir = Path(tokenizer.model_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256((model_dir / name).read_bytes()).digest())
    h.update(json.dumps([tokenizer.bos_id, tokenizer.eos_id, sorted(tokenizer.eos_ids), tokenizer.vocab_size,
                         tokenizer.add_bos_token]).encode())
    return h.hexdigest()


def cache_key(**parts) -> str:
    """A short hash of everything that determines the tokens."""
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_records(records: Records, fmt: str, tokenizer, max_seq_len: int, train_on_input: bool,
                     chunk: bool = False) -> TokenizedSet:
    """Tokenize every record; over-long examples are truncated (or, with `chunk`, split into max_seq_len pieces).

    Examples left with no trained token are dropped. Both are counted in `stats`.
    """
    if fmt == "auto":
        fmt = detect_format(records.rows[0], records.where(0))
    ids_parts, label_parts, lengths = [], [], []
    truncated = dropped = 0
    for i, row in enumerate(records.rows):
        ids, labels = tokenize_record(row, fmt, tokenizer, train_on_input, records.where(i))
        pieces = range(0, len(ids), max_seq_len) if chunk else [0]
        for start in pieces:
            done = finish_example(ids[start:], labels[start:], max_seq_len)
            if done is None:
                dropped += 1
                continue
            truncated += done[2] and not chunk
            ids_parts.append(done[0])
            label_parts.append(done[1])
            lengths.append(len(done[0]))
    if not ids_parts:
        raise DataError(f"{records.name}: no example has a trained token left after truncation to "
                         f"{max_seq_len} tokens; raise data.max_seq_len")
    input_ids, labels = np.concatenate(ids_parts), np.concatenate(label_parts)
    stats = dict(name=records.name, format=fmt, records=len(records), examples=len(lengths), truncated=int(truncated),
                 dropped=dropped, tokens=int(len(input_ids)), trained_tokens=int((labels != -100).sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSet(input_ids, labels, offsets, stats)


def tokenize_cached(records: Records, fmt: str, tokenizer, max_seq_len: int, train_on_input: bool,
                    cache_dir: str, chunk: bool = False) -> TokenizedSet:
    """`tokenize_records`, read from / written to `cache_dir` ("" = no cache)."""
    if not cache_dir:
        return tokenize_records(records, fmt, tokenizer, max_seq_len, train_on_input, chunk)
    key = cache_key(content=records.content_hash, tokenizer=tokenizer_fingerprint(tokenizer), format=fmt,
                    max_seq_len=max_seq_len, train_on_input=train_on_input, chunk=chunk)
    entry = Path(cache_dir).expanduser() / key
    if (entry / "stats.json").is_file():
        cached = TokenizedSet.load(entry)
        cached.stats["name"] = records.name
        return cached
    result = tokenize_records(records, fmt, tokenizer, max_seq_len, train_on_input, chunk)
    result.save(entry)
    return result
