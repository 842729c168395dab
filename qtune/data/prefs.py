"""Preference data: records -> prompts with ranked responses -> token ids with response masks -> batches.

Record layouts (`data.format`, or detected from the first record's fields):

    pairs     {"prompt", "chosen", "rejected"}                 prompt: raw text, or chat messages (role/content)
    ranking   {"prompt", "responses": [best, ..., worst]}       K >= 2 responses, best first (InstructGPT)
    sharegpt  {"conversations": [{from, value}, ...], "chosen": {from, value}, "rejected": {from, value}}
    chat      {"messages": [{role, content}, ...], "chosen", "rejected"}
    hh        {"chosen", "rejected"}: two whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic
              HH-RLHF); the prompt is their shared text up to and including the last "\\n\\nAssistant:"

Every layout may add "margin" (Llama 2's preference strength, subtracted from each reward difference of
the record) and scores for the pointwise loss: "chosen_score" / "rejected_score", or "scores" beside
"responses". A reply may be a string, a {from, value} / {role, content} object, or a list of one such.

Raw-text prompts are encoded as they are (plus BOS when the model wants one) and each response gets EOS;
chat prompts are rendered with the model's chat template and each response is the template's rendering of
one more assistant turn. Each record becomes K sequences prompt + response_k, laid out together in one
micro-batch, so a ranking's K(K−1)/2 pairs are always scored from one batch.
"""

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from qtune.data.batching import DataPosition, epoch_batches
from qtune.data.prompts import HH_ASSISTANT
from qtune.data.records import DataError, load_records
from qtune.data.render import IGNORE, chat_turns, render_chat, turn_token_span

REQUIRED = {"pairs": ("prompt", "chosen", "rejected"), "ranking": ("prompt", "responses"),
            "sharegpt": ("conversations", "chosen", "rejected"), "chat": ("messages", "chosen", "rejected"),
            "hh": ("chosen", "rejected")}
ASSISTANT_ROLES = ("assistant", "gpt")
_SPLIT_STREAM = 0  # the numpy stream (seed, 0) draws the validation split, as in the SFT pipeline


@dataclass
class Preference:
    """One record: a prompt and K >= 2 different responses ordered best to worst."""

    prompt: str | list[dict]  # raw text, or chat messages rendered with the model's chat template
    responses: list[str]  # best first
    margin: float = 0.0  # subtracted from every reward difference of the record (Llama 2)
    scores: list[float] | None = None  # one per response, for the pointwise loss
    where: str = ""  # "file line N" / "file record i", for error messages


class TokenizedPreference(NamedTuple):
    prompt_ids: np.ndarray  # (P,) int32
    response_ids: tuple  # K arrays (R_k,) int32, best first
    margin: float
    scores: np.ndarray | None  # (K,) float32, or None when the record has none

    @property
    def n_tokens(self) -> int:
        return sum(len(self.prompt_ids) + len(r) for r in self.response_ids)


# ----------------------------------------------------------------------------- parsing

def detect_pref_format(row: dict, where: str) -> str:
    """The layout a record's fields imply (see the module docstring)."""
    if "responses" in row:
        return "ranking"
    for fmt in ("sharegpt", "chat", "pairs"):
        if REQUIRED[fmt][0] in row:
            return fmt
    if "chosen" in row and "rejected" in row:
        return "hh"
    layouts = "; ".join(f"{fmt}: {', '.join(keys)}" for fmt, keys in REQUIRED.items())
    raise DataError(f"{where}: cannot tell the preference layout from fields {sorted(row)}; expected one of "
                    f"({layouts}), or set data.format")


def _nonempty_text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key} is empty; every response needs text to be compared")
    return value


def reply_text(value, where: str, key: str) -> str:
    """A reply given as a string, a {from, value} / {role, content} object, or a one-element list of one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: {key} is a list of {len(value)} turns; give the reply as one string "
                            "or one {role, content} object")
        value = value[0]
    if isinstance(value, dict):
        role, text = value.get("role", value.get("from")), value.get("content", value.get("value"))
        if role is not None and role not in ASSISTANT_ROLES:
            raise DataError(f"{where}: {key} comes from {role!r}; a reply must come from one of {ASSISTANT_ROLES}")
        if text is None:
            raise DataError(f"{where}: {key} has no 'content' (or 'value') text (keys: {sorted(value)})")
        value = text
    return _nonempty_text(value, where, key)


def _messages(turns, where: str, key: str, sharegpt: bool) -> list[dict]:
    """The prompt's chat messages (role/content, or ShareGPT from/value); the compared replies answer its last turn."""
    messages = chat_turns(turns, where, key, sharegpt)
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: {key!r} ends with a {messages[-1]['role']} turn; the compared replies answer it, "
                        "so it must end with the user's turn")
    return messages


def record_prompt(row: dict, fmt: str, where: str) -> str | list[dict]:
    if fmt == "sharegpt":
        return _messages(row["conversations"], where, "conversations", sharegpt=True)
    if fmt == "chat":
        return _messages(row["messages"], where, "messages", sharegpt=False)
    prompt = row["prompt"]
    if isinstance(prompt, list):
        return _messages(prompt, where, "prompt", sharegpt=False)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be non-empty text or a list of chat messages, got {prompt!r:.60}")
    return prompt


def split_hh(chosen, rejected, where: str) -> tuple[str, list[str]]:
    """(prompt, [chosen reply, rejected reply]) of two HH transcripts sharing all but their last reply."""
    for key, text in (("'chosen'", chosen), ("'rejected'", rejected)):
        if not isinstance(text, str) or HH_ASSISTANT not in text:
            raise DataError(f"{where}: {key} has no {HH_ASSISTANT!r} turn; hh records hold whole "
                            "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts")
    prompt = chosen[:chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)]
    if rejected[:rejected.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)] != prompt:
        raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last {HH_ASSISTANT!r}; an hh pair "
                        "must share the conversation up to the two compared replies")
    return prompt, [chosen[len(prompt):], rejected[len(prompt):]]


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _scores(row: dict, fmt: str, where: str, k: int) -> list[float] | None:
    if fmt == "ranking":
        if "scores" not in row:
            return None
        scores = row["scores"]
        if not isinstance(scores, list) or len(scores) != k:
            raise DataError(f"{where}: 'scores' must be a list of {k} numbers, one per response")
        return [_number(s, where, f"'scores[{i}]'") for i, s in enumerate(scores)]
    present = [key for key in ("chosen_score", "rejected_score") if key in row]
    if not present:
        return None
    if len(present) == 1:
        raise DataError(f"{where}: has {present[0]!r} but not the other; give both chosen_score and rejected_score")
    return [_number(row["chosen_score"], where, "'chosen_score'"), _number(row["rejected_score"], where, "'rejected_score'")]


def parse_preference(row: dict, fmt: str, where: str) -> Preference:
    """Check one record of layout `fmt` and read it; every problem is a DataError naming `where`."""
    missing = [key for key in REQUIRED[fmt] if key not in row]
    if missing:
        raise DataError(f"{where}: a {fmt!r} record needs {', '.join(map(repr, REQUIRED[fmt]))}; "
                        f"{', '.join(map(repr, missing))} missing (fields: {sorted(row)})")
    if fmt == "hh":
        prompt, replies = split_hh(row["chosen"], row["rejected"], where)
        names = ["the 'chosen' reply", "the 'rejected' reply"]
        responses = [_nonempty_text(r, where, name) for r, name in zip(replies, names)]
    else:
        prompt = record_prompt(row, fmt, where)
        if fmt == "ranking":
            if not isinstance(row["responses"], list) or len(row["responses"]) < 2:
                got = len(row["responses"]) if isinstance(row["responses"], list) else repr(row["responses"])
                raise DataError(f"{where}: a ranking needs a list of at least 2 responses (best first), got {got}")
            names = [f"'responses[{i}]'" for i in range(len(row["responses"]))]
            replies = row["responses"]
        else:
            names, replies = ["'chosen'", "'rejected'"], [row["chosen"], row["rejected"]]
        responses = [reply_text(r, where, name) for r, name in zip(replies, names)]
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j]:
                raise DataError(f"{where}: {names[i]} and {names[j]} are identical; a preference needs different "
                                "responses to compare")
    margin = _number(row.get("margin", 0.0), where, "'margin'")
    if margin < 0:
        raise DataError(f"{where}: 'margin' is {margin}; it says how much better the chosen response is, so >= 0")
    return Preference(prompt, responses, margin, _scores(row, fmt, where, len(responses)), where)


def load_preferences(path: str, fmt: str = "auto", split: str = "train", bad_records: str = "error"
                     ) -> tuple[list[Preference], list[str]]:
    """Every usable record of `path`, and the problems of the records skipped (bad_records="skip")."""
    records = load_records(path, split)
    if fmt == "auto":
        fmt = detect_pref_format(records.rows[0], records.where(0))
    prefs, skipped = [], []
    for i, row in enumerate(records.rows):
        try:
            prefs.append(parse_preference(row, fmt, records.where(i)))
        except DataError as e:
            if bad_records != "skip":
                raise DataError(f"{e} (to leave such records out, set data.bad_records = \"skip\" in the recipe, "
                                "or pass --bad-records skip to qtune eval-prefs)") from None
            skipped.append(str(e))
    if not prefs:
        raise DataError(f"{path}: none of its {len(records)} records is usable; the first problem: {skipped[0]}")
    return prefs, skipped


# ----------------------------------------------------------------------------- tokenizing

def _chat_ids(messages: list[dict], responses: list[str], tokenizer, where: str) -> tuple[list[int], list[list[int]]]:
    """Prompt ids = the conversation with the generation prompt (what the model reads before it answers);
    reply ids = the tokens the template writes for one more assistant turn (its reply and end of turn).

    The reply is located in the render of the whole conversation as SFT locates an assistant turn, so a template
    that renders the prompt differently once a reply follows (Mistral Nemo drops the system prompt it put in
    the last user turn) still yields the prompt the model is asked with and the reply it is trained on.
    """
    if not tokenizer.has_chat_template:
        raise DataError(f"{where}: chat preferences need a chat template and the model's tokenizer has none; "
                        "give the prompt as raw text instead")
    prompt_ids = tokenizer.encode(render_chat(tokenizer, messages, where, add_generation_prompt=True))
    replies = []
    for reply in responses:
        conversation = messages + [{"role": "assistant", "content": reply}]
        full_text = render_chat(tokenizer, conversation, where)
        ids = tokenizer.encode(full_text)
        start, end = turn_token_span(tokenizer, conversation, full_text, ids, len(messages), where)
        reply_ids = ids[start:end]
        if not any(t in tokenizer.eos_ids for t in reply_ids):
            reply_ids.append(tokenizer.eos_id)
        replies.append(reply_ids)
    return prompt_ids, replies


def truncate(prompt: list[int], responses: list[list[int]], max_seq_len: int) -> tuple[list[int], list[list[int]]]:
    """Fit prompt + each response into max_seq_len tokens.

    The prompt keeps its *last* tokens (those next to the reply matter most), shortened to what the longest
    response leaves but never below half of max_seq_len; responses are then cut at the end.
    """
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_seq_len:
        return prompt, responses
    keep = min(len(prompt), max(max_seq_len - longest, max_seq_len // 2))
    prompt = prompt[len(prompt) - keep:]
    return prompt, [r[:max_seq_len - keep] for r in responses]


class Truncation(NamedTuple):
    """What fitting one record into max_seq_len cost it."""

    prompt_cut: bool  # the prompt lost its first tokens
    responses_cut: bool  # at least one response lost its last tokens (its reward no longer sees its end)

    def __bool__(self) -> bool:
        return self.prompt_cut or self.responses_cut


def tokenize_preference(pref: Preference, tokenizer, max_seq_len: int) -> tuple[TokenizedPreference | None, Truncation]:
    """(tokenized record, what truncation cut); None when truncation left two responses identical."""
    if isinstance(pref.prompt, str):
        prompt = tokenizer.encode(pref.prompt, add_bos=tokenizer.add_bos_token)
        responses = [tokenizer.encode(r) + [tokenizer.eos_id] for r in pref.responses]
    else:
        prompt, responses = _chat_ids(pref.prompt, pref.responses, tokenizer, pref.where)
    cut_prompt, cut = truncate(prompt, responses, max_seq_len)
    truncated = Truncation(len(cut_prompt) < len(prompt), any(len(a) < len(b) for a, b in zip(cut, responses)))
    if len({tuple(r) for r in cut}) < len(cut):
        return None, truncated
    scores = np.asarray(pref.scores, np.float32) if pref.scores is not None else None
    return TokenizedPreference(np.asarray(cut_prompt, np.int32), tuple(np.asarray(r, np.int32) for r in cut),
                               pref.margin, scores), truncated


def tokenize_preferences(prefs: list[Preference], tokenizer, max_seq_len: int, name: str = "the data"
                         ) -> tuple[list[TokenizedPreference], dict]:
    """Tokenize every record; counts truncated ones and drops those whose responses became identical.

    stats: records, truncated (any cut), responses_cut (records with a response shortened), dropped (and the
    first few dropped_where), sequences, pairs.
    """
    items, truncated, responses_cut, dropped = [], 0, 0, []
    for pref in prefs:
        item, cut = tokenize_preference(pref, tokenizer, max_seq_len)
        truncated += bool(cut)
        responses_cut += cut.responses_cut
        if item is None:
            dropped.append(pref.where)
        else:
            items.append(item)
    if not items:
        raise DataError(f"{name}: after truncation to {max_seq_len} tokens every record's "
                        "responses are identical; raise data.max_seq_len")
    stats = {"records": len(prefs), "truncated": truncated, "responses_cut": responses_cut,
             "dropped": len(dropped), "dropped_where": dropped[:5],
             "sequences": sum(len(it.response_ids) for it in items), "pairs": sum(n_pairs(it) for it in items)}
    return items, stats


def n_pairs(item: TokenizedPreference) -> int:
    k = len(item.response_ids)
    return k * (k - 1) // 2


# ----------------------------------------------------------------------------- batches

def _long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def collate_preferences(items: list[TokenizedPreference], pad_id: int, indices=None) -> dict[str, torch.Tensor]:
    """Records -> one micro-batch of their S = Σ K_g sequences, record after record, best response first.

    Per sequence (S, T), right-padded: input_ids; attention_mask (1 = token, 0 = padding); position_ids;
    labels (the response tokens, -100 on prompt and padding). Per sequence (S,): ranking (its record g),
    rank (0 = best), score (NaN when the record has none). Per record (G,): n_responses, margin, index
    (`indices`, the records' positions in their dataset). Per pair (P,): better / worse (sequence indices of
    every i < j within each record) and pair_ranking (their record).
    """
    seqs = [(g, k, item.prompt_ids, resp) for g, item in enumerate(items) for k, resp in enumerate(item.response_ids)]
    S, T = len(seqs), max(len(p) + len(r) for _, _, p, r in seqs)
    input_ids = np.full((S, T), pad_id, np.int64)
    labels = np.full((S, T), IGNORE, np.int64)
    mask = np.zeros((S, T), np.int64)
    for s, (_, _, prompt, resp) in enumerate(seqs):
        n_p, n = len(prompt), len(prompt) + len(resp)
        input_ids[s, :n_p], input_ids[s, n_p:n] = prompt, resp
        labels[s, n_p:n] = resp
        mask[s, :n] = 1
    better, worse, pair_ranking, first = [], [], [], 0
    for g, item in enumerate(items):
        k = len(item.response_ids)
        for i in range(k):
            for j in range(i + 1, k):
                better.append(first + i)
                worse.append(first + j)
                pair_ranking.append(g)
        first += k
    scores = [item.scores[k] if item.scores is not None else math.nan for g, item in enumerate(items)
              for k in range(len(item.response_ids))]
    return {
        "input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask), "position_ids": torch.arange(T).expand(S, T).clone(),
        "ranking": _long([g for g, _, _, _ in seqs]), "rank": _long([k for _, k, _, _ in seqs]),
        "score": torch.tensor(scores, dtype=torch.float32),
        "n_responses": _long([len(it.response_ids) for it in items]),
        "margin": torch.tensor([it.margin for it in items], dtype=torch.float32),
        "index": _long(indices if indices is not None else range(len(items))),
        "better": _long(better), "worse": _long(worse), "pair_ranking": _long(pair_ranking),
    }


@dataclass
class PreferenceData:
    """Tokenized training and held-out records, and the resumable stream of training micro-batches."""

    train: list[TokenizedPreference]
    val: list[TokenizedPreference]
    stats: dict
    pad_id: int
    shuffle: bool = True
    group_by_length: bool = True

    def batches_per_epoch(self, micro_batch_size: int) -> int:
        return -(-len(self.train) // micro_batch_size)

    def describe(self) -> str:
        """One line for the console: records, pairs, and what was truncated, dropped or skipped."""
        s = self.stats
        line = (f"data: {s['train_examples']} train / {s['val_examples']} held-out records "
                f"({s['train_pairs']} / {s['val_pairs']} pairs), {s['trained_tokens']} response tokens")
        if s["truncated"]:
            line += f", {s['truncated']} truncated to max_seq_len"
            if s["responses_cut"]:  # those rewards are read mid-reply, before the reply's end
                line += f" ({s['responses_cut']} with responses cut short)"
        if s["dropped"]:
            line += f", {s['dropped']} dropped (responses identical after truncation; first: {s['dropped_where'][0]})"
        if s["skipped"]:
            line += f", {s['skipped']} bad records skipped (first: {s['skipped_problems'][0]})"
        return line

    def collate(self, items: list, indices) -> dict[str, torch.Tensor]:
        """One micro-batch of `items`, whose dataset positions are `indices`."""
        return collate_preferences(items, self.pad_id, indices)

    def batches(self, micro_batch_size: int, seed: int, start: DataPosition = DataPosition()
                ) -> Iterator[tuple[DataPosition, dict]]:
        """Endless training micro-batches of `micro_batch_size` records from `start`; yields (position after, batch)."""
        lengths = np.array([it.n_tokens for it in self.train], np.int64)
        epoch, first = start.epoch, start.index
        while True:
            plan = epoch_batches(lengths, micro_batch_size, seed, epoch, self.shuffle, self.group_by_length)
            if first > len(plan):
                raise ValueError(f"data position {start} is past the end of epoch {epoch} ({len(plan)} micro-batches); "
                                 "the checkpoint was made with different data or micro_batch_size")
            for k in range(first, len(plan)):
                after = DataPosition(epoch, k + 1) if k + 1 < len(plan) else DataPosition(epoch + 1, 0)
                yield after, self.collate([self.train[i] for i in plan[k]], plan[k])
            epoch, first = epoch + 1, 0

    def val_batches(self, micro_batch_size: int) -> Iterator[dict]:
        """Held-out micro-batches in a fixed order."""
        for i in range(0, len(self.val), micro_batch_size):
            yield self.collate(self.val[i:i + micro_batch_size], range(i, min(i + micro_batch_size, len(self.val))))


def fixed_batches(items: list[TokenizedPreference], micro_batch_size: int, pad_id: int) -> Iterator[dict]:
    """Micro-batches of `items` in their order (evaluation, reference log-probs)."""
    for i in range(0, len(items), micro_batch_size):
        yield collate_preferences(items[i:i + micro_batch_size], pad_id, range(i, min(i + micro_batch_size, len(items))))


def split_validation(items: list, data, seed: int) -> tuple[list, list]:
    """(train, held-out) records: data.val_size (or data.val_fraction) of them drawn with the seed's split stream."""
    n = len(items)
    k = data.val_size if data.val_size > 0 else round(data.val_fraction * n)
    if k >= n:
        raise DataError(f"{data.path}: holding out {k} records for validation leaves none of its {n} for training; "
                        "lower data.val_size / data.val_fraction")
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return [items[i] for i in np.sort(perm[k:])], [items[i] for i in np.sort(perm[:k])]


def build_preference_data(data, tokenizer, seed: int, need_scores: bool = False) -> PreferenceData:
    """Load, check, tokenize and split the records of a `[data]` recipe section (PrefDataSection)."""
    prefs, skipped = load_preferences(data.path, data.format, data.split, data.bad_records)
    if need_scores:
        unscored = next((p for p in prefs if p.scores is None), None)
        if unscored is not None:
            raise DataError(f"{unscored.where}: the pointwise loss needs scores, and this record has none; add "
                            "'chosen_score'/'rejected_score' (or 'scores' for rankings), or use reward.loss = \"pairwise\"")
    items, stats = tokenize_preferences(prefs, tokenizer, data.max_seq_len, data.path)
    train, val = split_validation(items, data, seed)
    stats = {**stats, "name": data.path, "skipped": len(skipped), "skipped_problems": skipped[:3],
             "train_examples": len(train), "val_examples": len(val),
             "train_pairs": sum(n_pairs(it) for it in train), "val_pairs": sum(n_pairs(it) for it in val),
             "trained_tokens": sum(sum(len(r) for r in it.response_ids) for it in train)}
    return PreferenceData(train, val, stats, tokenizer.pad_id, data.shuffle, data.group_by_length)
