"""What PPO and best-of-N share: prompts, sampling responses, scoring them, and batching prompt + response.

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
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qtune.data.batching import DataPosition
from qtune.data.records import DataError, load_records
from qtune.data.render import SHAREGPT_ROLES, alpaca_prompt
from qtune.generate import Generation, generate

HH_ASSISTANT = "\n\nAssistant:"
SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")
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


# ----------------------------------------------------------------------------- prompt records

def detect_prompt_format(row: dict, where: str) -> str:
    for key, fmt in (("prompt", "prompt"), ("messages", "chat"), ("conversations", "sharegpt"),
                     ("instruction", "alpaca"), ("chosen", "hh")):
        if key in row:
            return fmt
    raise DataError(f"{where}: cannot tell the prompt layout from fields {sorted(row)}; expected one of prompt, "
                    "messages, conversations, instruction or chosen (hh), or set data.format")


def _up_to_last_user_turn(turns, where: str, key: str, sharegpt: bool) -> list[dict]:
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str) or role_key not in turn:
            raise DataError(f"{where}: {key}[{k}] must be an object with {role_key!r} and a string {text_key!r}")
        role = SHAREGPT_ROLES.get(turn[role_key]) if sharegpt else turn[role_key]
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{k}] has {role_key}={turn[role_key]!r}; expected a system, user or "
                            "assistant turn")
        messages.append({"role": role, "content": turn[text_key]})
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
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
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


# ----------------------------------------------------------------------------- sampling and batching

def sample(model, prompts: list[Prompt], tokenizer, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, batch_size: int = 16, greedy: bool = False
           ) -> list[Generation]:
    """One response per prompt from the model's active adapter, with the KV-cache generator."""
    return generate(model, [p.ids for p in prompts], tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    greedy=greedy, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)


def collate_responses(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """Prompt + response sequences, right-padded, with where each response token is predicted.

    (S, L): input_ids, attention_mask (1 = token, 0 = padding), position_ids. (S, R), R the longest response:
    response_cols, the position whose next-token distribution gives response token j (prompt length − 1 + j);
    targets, response token j (−100 past the response's end); response_mask.
    """
    S = len(prompt_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    R = max(len(r) for r in response_ids)
    input_ids = torch.full((S, L), pad_id, dtype=torch.long)
    mask = torch.zeros(S, L, dtype=torch.long)
    cols = torch.zeros(S, R, dtype=torch.long)
    targets = torch.full((S, R), -100, dtype=torch.long)
    for s, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"sequence {s} has an empty prompt or response; both need at least one token")
        n = len(p) + len(r)
        input_ids[s, :n] = torch.tensor(list(p) + list(r))
        mask[s, :n] = 1
        cols[s] = (len(p) - 1 + torch.arange(R)).clamp(max=L - 1)
        targets[s, :len(r)] = torch.tensor(list(r))
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": torch.arange(L).expand(S, L).clone(),
            "response_cols": cols, "targets": targets, "response_mask": (targets != -100).long()}


def micro_batches(batch: dict, size: int, rows: torch.Tensor | None = None) -> Iterator[dict]:
    """`batch` cut into pieces of `size` rows (in the order `rows` gives), each trimmed to its longest sequence.

    (S, L) tensors are the SEQUENCE_KEYS; every other 2-D tensor is per response token (S, R), 1-D ones per row.
    """
    rows = rows if rows is not None else torch.arange(len(batch["input_ids"]))
    for i in range(0, len(rows), size):
        piece = {k: v[rows[i:i + size]] for k, v in batch.items()}
        L = int(piece["attention_mask"].sum(1).max())
        R = int(piece["response_mask"].sum(1).max())
        for k, v in piece.items():
            if v.dim() == 2:
                piece[k] = v[:, :L] if k in SEQUENCE_KEYS else v[:, :R]
        piece["response_cols"] = piece["response_cols"].clamp(max=L - 1)
        yield piece


# ----------------------------------------------------------------------------- scoring

class FunctionScorer:
    """A verifiable reward: a Python function f(prompt, response, record) -> float per response."""

    def __init__(self, spec: str):
        from qtune.align.reward_functions import load_reward_function

        self.spec, self.fn = spec, load_reward_function(spec)

    def score(self, prompts: list[Prompt], generations: list[Generation]) -> torch.Tensor:
        """One score per (prompt, generation), (S,) fp32."""
        scores = []
        for p, g in zip(prompts, generations):
            value = self.fn(p.text, g.text, p.record)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"reward function {self.spec} returned {value!r} for a response to {p.text[-80:]!r}; "
                                 "it must return a finite number")
            scores.append(float(value))
        return torch.tensor(scores, dtype=torch.float32)


class ModelScorer:
    """A reward model (adapter + head on the shared base), read at each response's last token."""

    def __init__(self, reward_model, pad_id: int, micro_batch_size: int, device):
        self.reward_model, self.pad_id, self.micro_batch_size, self.device = reward_model, pad_id, micro_batch_size, device

    @torch.no_grad()
    def score(self, prompts: list[Prompt], generations: list[Generation]) -> torch.Tensor:
        """One score per (prompt, generation), (S,) fp32, computed in eval mode."""
        base = self.reward_model.base
        was_training = base.training
        base.eval()
        batch = collate_responses([p.ids for p in prompts], [g.token_ids for g in generations], self.pad_id)
        scores = []
        try:
            for piece in micro_batches(batch, self.micro_batch_size):
                piece = {k: v.to(self.device) for k, v in piece.items()}
                scores.append(self.reward_model.score(piece).float().cpu())
        finally:
            base.train(was_training)
        return torch.cat(scores)


def build_scorer(section, model, pad_id: int, micro_batch_size: int, device):
    """The recipe's reward: its reward model joins `model` as adapter "reward", or its reward function is imported."""
    if section.reward_fn:
        return FunctionScorer(section.reward_fn)
    from qtune.align.reward_model import load_reward_model

    if not Path(section.reward_model).is_dir():
        raise FileNotFoundError(f"reward model {section.reward_model}: no such directory; train one with "
                                "`qtune reward RECIPE` (it writes output.dir/adapter) or name a reward_fn instead")
    return ModelScorer(load_reward_model(model, section.reward_model, name="reward"), pad_id, micro_batch_size, device)
