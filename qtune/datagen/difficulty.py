"""Instruction-following difficulty (IFD) of generated examples, and dropping the easiest and hardest.

IFD (Li et al. 2023, "From Quantity to Quality", the Cherry LLM method; docs: data-pipelines §4) compares
how well the model predicts an answer with and without its instruction:

    L_cond  = mean cross-entropy of the answer tokens after the Alpaca training prompt (instruction, input)
    L_alone = mean cross-entropy of the same answer tokens after a bare "### Response:"
    IFD     = L_cond / L_alone

A low IFD means the instruction makes the answer easy to predict; near or above 1 the instruction does
not help (often a mismatched pair). Answer tokens are encoded once and appended to both prefixes, so both
losses are over exactly the same tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qtune.data.render import alpaca_prompt

# After "### Response:" the Alpaca template appends the answer directly; the unconditioned loss keeps only that.
ALONE_PREFIX = "### Response:"


@torch.no_grad()
def answer_losses(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 4) -> list[float]:
    """Mean cross-entropy of each answer given its prefix; `sequences` holds (prefix_ids, answer_ids).

    Rows are right-padded, so causal attention keeps the real tokens' logits independent of the padding.
    """
    device = model.model.embed_tokens.weight.device
    losses: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        T = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
        labels = torch.full((len(batch), T), -100, dtype=torch.long, device=device)
        for b, (prefix, answer) in enumerate(batch):
            row = torch.tensor(prefix + answer, device=device)
            ids[b, :len(row)] = row
            labels[b, len(prefix):len(row)] = row[len(prefix):]
        logits = model(ids)  # (B, T, V)
        # position t predicts token t + 1
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                     ignore_index=-100, reduction="none").view(len(batch), T - 1)  # (B, T-1)
        counts = (labels[:, 1:] != -100).sum(-1)  # (B,)
        losses += (token_loss.sum(-1) / counts.clamp(min=1)).tolist()
    return losses


@dataclass
class IFDScore:
    loss_cond: float
    loss_alone: float
    ifd: float  # NaN when the example could not be scored (empty answer, too long)

    def as_dict(self) -> dict:
        return {"loss_cond": self.loss_cond, "loss_alone": self.loss_alone, "ifd": self.ifd}


def ifd_scores(model, tokenizer, examples: list[dict], batch_size: int = 4, max_length: int = 512) -> list[IFDScore]:
    """IFD of every {instruction, input, output} example (NaN for empty answers or over `max_length` tokens)."""
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_id is not None else []
    alone_prefix = bos + tokenizer.encode(ALONE_PREFIX)
    cond, alone, scored = [], [], []
    for k, ex in enumerate(examples):
        answer = tokenizer.encode(ex["output"])
        prefix = bos + tokenizer.encode(alpaca_prompt(ex))
        if answer and len(prefix) + len(answer) <= max_length:
            cond.append((prefix, answer))
            alone.append((alone_prefix, answer))
            scored.append(k)
    scores = [IFDScore(math.nan, math.nan, math.nan) for _ in examples]
    for k, lc, la in zip(scored, answer_losses(model, cond, batch_size), answer_losses(model, alone, batch_size)):
        scores[k] = IFDScore(lc, la, lc / la if la > 0 else math.nan)
    return scores


UNSCORED = "difficulty_unscored"
ABOVE_MAX = "difficulty_ifd_above_max"
EASIEST = "difficulty_easiest"
HARDEST = "difficulty_hardest"


def difficulty_drops(ifds: list[float], drop_easiest: float, drop_hardest: float, max_ifd: float) -> list[str | None]:
    """The reason each example is dropped (None = kept).

    First examples without a score, then those with IFD >= `max_ifd` (when > 0); of the rest, sorted by IFD,
    the lowest floor(n * drop_easiest) and the highest floor(n * drop_hardest). Ties keep file order.
    """
    reasons: list[str | None] = [None] * len(ifds)
    ranked = []
    for k, ifd in enumerate(ifds):
        if ifd is None or math.isnan(ifd):
            reasons[k] = UNSCORED
        elif max_ifd > 0 and ifd >= max_ifd:
            reasons[k] = ABOVE_MAX
        else:
            ranked.append(k)
    ranked.sort(key=lambda k: ifds[k])
    n_easy, n_hard = int(len(ranked) * drop_easiest), int(len(ranked) * drop_hardest)
    for k in ranked[:n_easy]:
        reasons[k] = EASIEST
    for k in ranked[len(ranked) - n_hard:] if n_hard else []:
        reasons[k] = HARDEST
    return reasons
