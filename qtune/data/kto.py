"""Unpaired preference data for KTO: records -> (prompt, completion, label) -> token ids -> batches that also carry
the mismatched pairs KTO estimates its reference point from.

Record layout (`data.format = "kto"`, or "auto" with `dpo.loss = "kto"`):

    {"prompt": text or chat messages, "completion": reply, "label": true | false}

true marks a desirable completion, false an undesirable one. In the chat form the prompt is a list of
{role, content} messages ending with the user's turn and the reply a {role: "assistant", content} object (or a
list of one), as TRL's unpaired conversational records are; a plain string works in both forms. Prompts and
replies are tokenized exactly as the paired layouts' (`qtune.data.prefs`), each record as one response.

Each micro-batch holds G records as two sub-batches: "completions" (prompt i + completion i) and "kl"
(prompt i + completion i − 1 of the same micro-batch, cyclically, as TRL rotates them); a one-record
micro-batch pairs its prompt with its own completion.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from qtune.data.prefs import (Preference, PreferenceData, TokenizedPreference, collate_preferences, record_prompt,
                              reply_text, split_validation, tokenize_preference)
from qtune.data.records import DataError, load_records

KTO_FIELDS = ("prompt", "completion", "label")


class KTOExample(NamedTuple):
    prompt_ids: np.ndarray  # (P,) int32
    completion_ids: np.ndarray  # (R,) int32, ending with EOS
    desirable: bool

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def parse_kto_record(row: dict, where: str) -> tuple[Preference, bool]:
    """(the prompt with its one completion, whether it is desirable); every problem is a DataError naming `where`."""
    missing = [key for key in KTO_FIELDS if key not in row]
    if missing:
        raise DataError(f"{where}: a KTO record needs {', '.join(map(repr, KTO_FIELDS))}; "
                        f"{', '.join(map(repr, missing))} missing (fields: {sorted(row)})")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true (a desirable completion) or false (an undesirable one), "
                        f"got {label!r}")
    completion = reply_text(row["completion"], where, "'completion'")
    return Preference(record_prompt(row, "pairs", where), [completion], where=where), label


def load_kto_records(path: str, split: str = "train", bad_records: str = "error") -> tuple[list, list[str]]:
    """Every usable (Preference, desirable) of `path`, and the problems of the records skipped (bad_records="skip")."""
    records = load_records(path, split)
    usable, skipped = [], []
    for i, row in enumerate(records.rows):
        try:
            usable.append(parse_kto_record(row, records.where(i)))
        except DataError as e:
            if bad_records != "skip":
                raise DataError(f"{e} (to leave such records out, set data.bad_records = \"skip\" in the recipe)") from None
            skipped.append(str(e))
    if not usable:
        raise DataError(f"{path}: none of its {len(records)} records is usable; the first problem: {skipped[0]}")
    return usable, skipped


def collate_kto(items: list[KTOExample], pad_id: int, indices, max_seq_len: int) -> dict:
    """G records -> {"completions": batch, "kl": batch, "desirable": (G,) bool, "index": (G,)}.

    Both sub-batches are laid out as `collate_preferences` lays out one-response records. A KL completion too
    long for its prompt loses its last tokens, to fit max_seq_len.
    """
    matched = [TokenizedPreference(it.prompt_ids, (it.completion_ids,), 0.0, None) for it in items]
    mismatched = [TokenizedPreference(it.prompt_ids, (items[g - 1].completion_ids[:max_seq_len - len(it.prompt_ids)],),
                                      0.0, None) for g, it in enumerate(items)]
    indices = list(indices)
    return {"completions": collate_preferences(matched, pad_id, indices),
            "kl": collate_preferences(mismatched, pad_id, indices),
            "desirable": torch.tensor([it.desirable for it in items], dtype=torch.bool),
            "index": torch.tensor(indices, dtype=torch.int64)}


@dataclass
class KTOData(PreferenceData):
    """Tokenized training and held-out KTO records; batches as `PreferenceData`'s, collated by `collate_kto`."""

    max_seq_len: int = 512

    def collate(self, items: list, indices) -> dict:
        return collate_kto(items, self.pad_id, indices, self.max_seq_len)

    def describe(self) -> str:
        s = self.stats
        line = (f"data: {s['train_examples']} train / {s['val_examples']} held-out KTO records "
                f"({s['desirable']} desirable, {s['undesirable']} undesirable in training), "
                f"{s['trained_tokens']} completion tokens")
        if s["truncated"]:
            line += f", {s['truncated']} truncated to max_seq_len"
        if s["skipped"]:
            line += f", {s['skipped']} bad records skipped (first: {s['skipped_problems'][0]})"
        return line


def build_kto_data(data, tokenizer, seed: int) -> KTOData:
    """Load, check, tokenize and split the KTO records of a `[data]` recipe section (PrefDataSection)."""
    usable, skipped = load_kto_records(data.path, data.split, data.bad_records)
    items, truncated = [], 0
    for pref, desirable in usable:
        item, cut = tokenize_preference(pref, tokenizer, data.max_seq_len)  # one response: never dropped
        truncated += bool(cut)
        items.append(KTOExample(item.prompt_ids, item.response_ids[0], desirable))
    train, val = split_validation(items, data, seed)
    n_desirable = sum(it.desirable for it in train)
    stats = {"name": data.path, "records": len(items), "truncated": truncated, "skipped": len(skipped),
             "skipped_problems": skipped[:3], "train_examples": len(train), "val_examples": len(val),
             "desirable": n_desirable, "undesirable": len(train) - n_desirable,
             "trained_tokens": sum(len(it.completion_ids) for it in train)}
    return KTOData(train, val, stats, tokenizer.pad_id, data.shuffle, data.group_by_length, data.max_seq_len)
