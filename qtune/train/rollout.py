"""What PPO, GRPO and best-of-N share once prompts are loaded: sampling responses, batching prompt + response, scoring.

The prompt records themselves (their layouts, the chat template, the held-out split and the batch order)
live in qtune.data.prompts.
"""

import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qtune.align.reward_functions import answer_match, format_match, load_reward_function
from qtune.align.reward_model import load_reward_model
from qtune.data.prompts import Prompt, load_prompts
from qtune.generate import Generation, generate
from qtune.kernels.logprobs import token_logprobs_and_entropy

SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")


# ----------------------------------------------------------------------------- sampling and batching

def load_run_prompts(console, data, tokenizer, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts) of a [data] section, with one line about them on `console`."""
    train, val, stats = load_prompts(data, tokenizer, seed)
    console.print(f"prompts: {stats['train']} train / {stats['val']} held-out ({stats['format']} records), "
                  f"{stats['truncated']} truncated to {data.max_seq_len} tokens")
    return train, val


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


def response_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens. (S, R, D)"""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (S, L, D)
    rows = torch.arange(len(hidden), device=hidden.device)[:, None]
    return hidden[rows, batch["response_cols"]]


def response_logprobs(model, batch: dict, temperature: float):
    """log π(y_t | x, y_<t) and the entropy of π(· | x, y_<t) of the active adapter, (S, R) each, 0 off the mask.

    Sampling divided the logits by the temperature, and z / τ = (h / τ) Wᵀ, so dividing the hidden states
    gives the sampled distribution without materialising any logits.
    """
    hidden = response_hidden(model, batch)
    cap = model.logit_softcap
    if temperature != 1.0:
        # logits / T; capped logits too: (cap / T) · tanh((z / T) / (cap / T)) = cap · tanh(z / cap) / T
        hidden = hidden / temperature
        cap = None if cap is None else cap / temperature
    return token_logprobs_and_entropy(hidden, model.output_weight(), batch["targets"], kernels=model.kernels,
                                      softcap=cap)


def scatter_rows(pieces: list[torch.Tensor], S: int, R: int) -> torch.Tensor:
    """Micro-batch results (each trimmed to its own response length) laid back into one (S, R) tensor."""
    out, row = torch.zeros(S, R), 0
    for piece in pieces:
        out[row:row + len(piece), :piece.shape[1]] = piece.float().cpu()
        row += len(piece)
    return out


# ----------------------------------------------------------------------------- scoring

class RewardError(ValueError):
    """A reward function raised, returned something other than a finite number, or the wrong count of them."""


def _checked(value, spec: str, prompt, response: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise RewardError(f"reward function {spec} returned {value!r} for the response {response[:80]!r} to the "
                          f"prompt {prompt.text[-80:]!r}; it must return a finite number")
    return float(value)


class FunctionScorer:
    """A verifiable reward: a Python function f(prompt, response, record) -> float per response, or, `batched`,
    f(prompts, responses, records) -> one float per response."""

    def __init__(self, spec: str, fn=None, batched: bool = False):
        self.spec, self.fn, self.batched = spec, fn or load_reward_function(spec), batched

    def score(self, prompts: list[Prompt], generations: list[Generation]) -> torch.Tensor:
        """One score per (prompt, generation), (S,) fp32; a failing function is a RewardError naming it."""
        if self.batched:
            values = self._call(prompts[0], generations[0].text, [p.text for p in prompts],
                                [g.text for g in generations], [p.record for p in prompts])
            if not isinstance(values, (list, tuple, np.ndarray, torch.Tensor)) or len(values) != len(prompts):
                raise RewardError(f"reward function {self.spec} returned {str(values)[:120]} for a batch of "
                                  f"{len(prompts)} responses (the first prompt {prompts[0].text[-80:]!r}); it must "
                                  "return one number per response")
            values = [v.item() if isinstance(v, (torch.Tensor, np.generic)) else v for v in values]
        else:
            values = [self._call(p, g.text, p.text, g.text, p.record) for p, g in zip(prompts, generations)]
        return torch.tensor([_checked(v, self.spec, p, g.text) for v, p, g in zip(values, prompts, generations)],
                            dtype=torch.float32)

    def _call(self, prompt: Prompt, response: str, *args):
        try:
            return self.fn(*args)
        except Exception as e:  # whatever user code raises, the run names the function and the input
            raise RewardError(f"reward function {self.spec} raised {type(e).__name__}: {e} for the response "
                              f"{response[:80]!r} to the prompt {prompt.text[-80:]!r}") from None


class LengthScorer:
    """The built-in length penalty: −(response tokens) / max_new_tokens, in [−1, 0)."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def score(self, prompts: list[Prompt], generations: list[Generation]) -> torch.Tensor:
        return -torch.tensor([len(g.token_ids) for g in generations], dtype=torch.float32) / self.max_new_tokens


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


def build_reward_scorers(specs, model, pad_id: int, micro_batch_size: int, max_new_tokens: int, device) -> list:
    """One scorer per GRPO reward table (`RewardSpec`): a reward adapter joins `model` as "reward<i>", a
    "module:function" is imported, and the built-ins ("answer", "format", "length") are bound to their settings."""
    scorers = []
    for i, spec in enumerate(specs):
        if spec.model:
            if not Path(spec.model).is_dir():
                raise FileNotFoundError(f"grpo.rewards[{i}].model {spec.model}: no such directory; train one with "
                                        "`qtune reward RECIPE` (it writes output.dir/adapter)")
            reward_model = load_reward_model(model, spec.model, name=f"reward{i}")
            scorers.append(ModelScorer(reward_model, pad_id, micro_batch_size, device))
        elif spec.fn == "answer":
            scorers.append(FunctionScorer(f"answer ({spec.extract})", functools.partial(_answer, extract=spec.extract)))
        elif spec.fn == "format":
            scorers.append(FunctionScorer(f"format ({spec.pattern})", functools.partial(_format, pattern=spec.pattern)))
        elif spec.fn == "length":
            scorers.append(LengthScorer(max_new_tokens))
        else:
            scorers.append(FunctionScorer(spec.fn, batched=spec.batched))
    return scorers


def _answer(prompt: str, response: str, record: dict, extract: str) -> float:
    return answer_match(response, record, extract)


def _format(prompt: str, response: str, record: dict, pattern: str) -> float:
    return format_match(response, pattern)


def plot_reward_curve(records: list[dict], path: Path, curves: list[tuple[str, str]], held_out: tuple[str, str],
                      x_label: str, kl_label: str) -> None:
    """An RL run's PNG: the `curves` (metrics key, label) per step and the `held_out` evaluations on the left, the
    KL to the reference on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "reward" in r]
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    for k, (key, label) in enumerate(curves):
        left.plot(steps, [r[key] for r in rows], "-" if k == 0 else "--", label=label)
    val = [(r["step"], r[held_out[0]]) for r in records if r.get(held_out[0]) is not None]
    if val:
        left.plot(*zip(*val), "o-", label=held_out[1])
    left.set_xlabel(x_label)
    left.set_ylabel("mean reward")
    left.legend(fontsize="small")
    right.plot(steps, [r["kl"] for r in rows])
    right.set_xlabel(x_label)
    right.set_ylabel(kl_label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
