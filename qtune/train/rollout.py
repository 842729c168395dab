"""What PPO and best-of-N share once prompts are loaded: sampling responses, batching prompt + response, scoring.

The prompt records themselves (their layouts, the chat template, the held-out split and the batch order)
live in qtune.data.prompts.
"""

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qtune.align.reward_functions import load_reward_function
from qtune.align.reward_model import load_reward_model
from qtune.data.prompts import Prompt
from qtune.generate import Generation, generate

SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")


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
    if not Path(section.reward_model).is_dir():
        raise FileNotFoundError(f"reward model {section.reward_model}: no such directory; train one with "
                                "`qtune reward RECIPE` (it writes output.dir/adapter) or name a reward_fn instead")
    return ModelScorer(load_reward_model(model, section.reward_model, name="reward"), pad_id, micro_batch_size, device)
