"""Prompt records: what PPO and best-of-N sample from, and the chat-turn parser preferences share.

Prompt records (`data.format`, or detected from the first record's fields):

    prompt    {"prompt": text or [{role, content}, ...], ...}
    alpaca    {"instruction", "input" (optional), ...}
    chat      {"messages": [{role, content}, ...], ...}          up to and including the last user turn
    sharegpt  {"conversations": [{from, value}, ...], ...}       likewise
    hh        {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", ...}  up to and including the last "\\n\\nAssistant:"

Text prompts become one user turn of the model's chat template when `data.chat` is true (hh transcripts are
always fed as they are). Every field of a record travels with its prompt, so a verifiable reward function
can read e.g. the record's "answer".
"""

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qtune.data.batching import DataPosition
from qtune.data.records import DataError, load_records
from qtune.data.render import alpaca_prompt, chat_turns, render_chat

HH_ASSISTANT = "\n\nAssistant:"
_SPLIT_STREAM, _ORDER_STREAM = 0, 1  # numpy streams: (seed, 0) the held-out split (as in SFT), (seed, 1, epoch) the order


@dataclass
class Prompt:
    ids: list[int]
    """The token ids the model continues (the last data.max_seq_len of them)."""
    text: str
    """The prompt as the model sees it (chat template applied), for reward functions."""
    record: dict
    """The data record the prompt came from."""
    messages: list[dict] | None = field(default=None, repr=False)
    """The chat turns (None for a raw-text prompt), so a kept response can become an SFT chat record."""


def detect_prompt_format(row: dict, where: str) -> str:
    for key, fmt in (("prompt", "prompt"), ("messages", "chat"), ("conversations", "sharegpt"),
                     ("instruction", "alpaca"), ("chosen", "hh")):
        if key in row:
            return fmt
    raise DataError(f"{where}: cannot tell the prompt layout from fields {sorted(row)}; expected one of prompt, "
                    "messages, conversations, instruction or chosen (hh), or set data.format")


def _up_to_last_user_turn(turns, where: str, key: str, sharegpt: bool) -> list[dict]:
    messages = chat_turns(turns, where, key, sharegpt)
    last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{where}: {key!r} has no user turn to answer")
    return messages[:last_user + 1]


def prompt_of(row: dict, fmt: str, chat: bool, where: str) -> str | list[dict]:
    """A record's prompt: chat messages, or raw text fed to the model as it is."""
    if fmt == "chat":
        return _up_to_last_user_turn(row.get("messages"), where, "messages", sharegpt=False)
    if fmt == "sharegpt":
        return _up_to_last_user_turn(row.get("conversations"), where, "conversations", sharegpt=True)
    if fmt == "hh":
        text = row.get("chosen")
        if not isinstance(text, str) or HH_ASSISTANT not in text:
            raise DataError(f"{where}: an hh record needs a 'chosen' transcript with a {HH_ASSISTANT!r} turn")
        return text[:text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)]
    if fmt == "alpaca":
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DataError(f"{where}: an alpaca record needs a non-empty 'instruction' (fields: {sorted(row)})")
        if not chat:
            return alpaca_prompt(row, where)
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": text}]
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _up_to_last_user_turn(prompt, where, "prompt", sharegpt=False)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be non-empty text or a list of chat messages, got {prompt!r:.60}")
    return [{"role": "user", "content": prompt}] if chat else prompt


def encode_prompt(prompt: str | list[dict], tokenizer, where: str) -> tuple[str, list[int]]:
    """(the text the model sees, its token ids)."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token)
    if not tokenizer.has_chat_template:
        raise DataError(f"{where}: chat prompts need a chat template and the model's tokenizer has none; set "
                        "data.chat = false (text prompts) or use an instruct model")
    text = render_chat(tokenizer, prompt, where, add_generation_prompt=True)
    return text, tokenizer.encode(text)


def load_prompts(data, tokenizer, seed: int) -> tuple[list[Prompt], list[Prompt], dict]:
    """(training prompts, held-out prompts, stats) from a `[data]` section (PromptDataSection)."""
    records = load_records(data.path, data.split)
    fmt = data.format if data.format != "auto" else detect_prompt_format(records.rows[0], records.where(0))
    prompts, truncated = [], 0
    for i, row in enumerate(records.rows):
        where = records.where(i)
        prompt = prompt_of(row, fmt, data.chat, where)
        text, ids = encode_prompt(prompt, tokenizer, where)
        if len(ids) > data.max_seq_len:
            ids, truncated = ids[-data.max_seq_len:], truncated + 1
        prompts.append(Prompt(ids, text, row, prompt if isinstance(prompt, list) else None))
    n_val = data.val_size if data.val_size > 0 else round(data.val_fraction * len(prompts))
    if n_val >= len(prompts):
        raise DataError(f"{data.path}: holding out {n_val} prompts leaves none of its {len(prompts)} for training; "
                        "lower data.val_size / data.val_fraction")
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(prompts))
    val = [prompts[i] for i in np.sort(perm[:n_val])]
    train = [prompts[i] for i in np.sort(perm[n_val:])]
    stats = {"format": fmt, "records": len(records), "train": len(train), "val": len(val), "truncated": truncated}
    return train, val, stats


def prompt_batches(n: int, batch_size: int, seed: int, shuffle: bool, start: DataPosition = DataPosition()
                   ) -> Iterator[tuple[DataPosition, np.ndarray]]:
    """Endless full batches of prompt indices, epoch after epoch, each epoch's order fixed by (seed, epoch).

    Yields (position after the batch, indices); an epoch's last partial batch is left out so every
    rollout batch has the same size. Resuming from a saved position continues with the next batch.
    """
    if n < batch_size:
        raise DataError(f"only {n} training prompts, fewer than one rollout batch of {batch_size}; "
                        "add prompts or lower the batch size")
    per_epoch = n // batch_size
    epoch, first = start.epoch, start.index
    while True:
        order = np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n) if shuffle else np.arange(n)
        for k in range(first, per_epoch):
            after = DataPosition(epoch, k + 1) if k + 1 < per_epoch else DataPosition(epoch + 1, 0)
            yield after, order[k * batch_size:(k + 1) * batch_size]
        epoch, first = epoch + 1, 0
