"""Reward models on a shared base: the frozen base + a named LoRA adapter + a scalar head.

    r(x, y) = w · h_last + b,   h_last = the final hidden state at the last non-padding token of prompt + response

Several reward models (helpfulness, harmlessness ...) can sit on *one* base model, each as its own named
adapter with its own head, and `CombinedReward` sums them with weights at scoring time. `ScalarHead` is
also what a PPO value model reads its values with.

On disk a reward model is a PEFT adapter directory whose `extra_tensors.safetensors` holds the head
(`score.weight` (1, D), `score.bias` (1,)).
"""

import math
from pathlib import Path

import torch
from torch import nn

from qtune.lora import adapter_names, use_adapter
from qtune.peft import load_adapter, load_extra_tensors
from qtune.peft.placement import place_in_batch
from qtune.align.preference_losses import pairwise_loss, preference_accuracy

HEAD_PREFIX = "score"
HEAD_INITS = ("normal", "zero")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding token in a right-padded (B, T) mask (0 = padding). (B,)"""
    return (attention_mask != 0).sum(1) - 1


class ScalarHead(nn.Module):
    """A Linear(D, 1) in fp32 read at one position per row: the reward (or value) of the sequence so far."""

    def __init__(self, hidden_size: int, seed: int = 0, device=None, init: str = "normal"):
        super().__init__()
        # "normal": OpenAI's reward head init (lm-human-preferences, Ziegler et al. 2019), N(0, 1/(D + 1)), which
        # gives unit-variance rewards on unit-variance features; the draw comes from its own generator, so the
        # global RNG is neither used nor advanced. "zero": every reward starts at 0, an indifferent model whose
        # first pairwise loss is ln 2 (the head learns first, the adapter from the second step on).
        if init not in HEAD_INITS:
            raise ValueError(f"head init {init!r} is not one of {', '.join(HEAD_INITS)}")
        weight = torch.zeros(1, hidden_size)
        if init == "normal":
            generator = torch.Generator().manual_seed(seed)
            weight = torch.randn(1, hidden_size, generator=generator) / math.sqrt(hidden_size + 1)
        self.linear = nn.Linear(hidden_size, 1, device="meta")
        self.linear.weight = nn.Parameter(weight.to(device))
        self.linear.bias = nn.Parameter(torch.zeros(1, device=device))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), attention_mask (B, T) right-padded -> the score at each row's last token, (B,) fp32."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_last = hidden[rows, last_token_index(attention_mask)]  # (B, D)
        return self.linear(h_last.float()).squeeze(-1)

    def tensors(self, prefix: str = HEAD_PREFIX) -> dict[str, torch.Tensor]:
        """The head's weights under the keys saved beside an adapter."""
        return {f"{prefix}.weight": self.linear.weight.detach(), f"{prefix}.bias": self.linear.bias.detach()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = HEAD_PREFIX, where: str = "") -> "ScalarHead":
        keys = (f"{prefix}.weight", f"{prefix}.bias")
        if any(k not in tensors for k in keys):
            raise ValueError(f"{where}: no scalar head ({keys[0]}, {keys[1]}) beside the adapter (found {sorted(tensors)}); "
                             "is this a reward adapter written by `qtune reward`?")
        weight = tensors[keys[0]]
        head = cls(weight.shape[-1], device=weight.device)
        with torch.no_grad():
            head.linear.weight.copy_(weight.reshape(1, -1))
            head.linear.bias.copy_(tensors[keys[1]].reshape(1))
        return head


class RewardModel:
    """Adapter `adapter` + `head` on a base model that other roles may share; `score` activates the adapter."""

    def __init__(self, base: nn.Module, adapter: str, head: ScalarHead):
        self.base, self.adapter, self.head = base, adapter, head

    def score(self, batch: dict) -> torch.Tensor:
        """Rewards (S,) of a batch's right-padded sequences (input_ids, attention_mask, position_ids)."""
        with use_adapter(self.base, self.adapter):
            batch = place_in_batch(self.base, batch)  # a P-tuning adapter's virtual tokens placed in the example
            hidden = self.base.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        return self.head(hidden, batch["attention_mask"])


def load_reward_model(base: nn.Module, adapter_dir, name: str | None = None) -> RewardModel:
    """Attach the reward adapter (and its head) saved in `adapter_dir` to `base` under adapter `name`."""
    adapter_dir = Path(adapter_dir)
    name = name or f"reward{len(adapter_names(base))}"
    load_adapter(base, adapter_dir, name=name)
    device = base.model.embed_tokens.weight.device
    head = ScalarHead.from_tensors(load_extra_tensors(adapter_dir), where=str(adapter_dir)).to(device)
    return RewardModel(base, name, head)


class CombinedReward:
    """Σ_i w_i r_i(x, y): several reward models on one base, combined at scoring time (e.g. helpful + harmless)."""

    def __init__(self, models: list[RewardModel], weights: list[float]):
        if len(models) != len(weights) or not models:
            raise ValueError(f"need one weight per reward model, got {len(models)} models and {len(weights)} weights")
        self.models, self.weights = models, weights

    def score(self, batch: dict) -> torch.Tensor:
        return sum(w * m.score(batch) for m, w in zip(self.models, self.weights))


@torch.no_grad()
def evaluate_reward(scorer: RewardModel | CombinedReward, batches, device, max_batches: int = 0) -> dict:
    """Held-out pairs scored in eval mode: accuracy (ties count 1/2), mean margin r⁺ − r⁻, n pairs and loss."""
    models = scorer.models if isinstance(scorer, CombinedReward) else [scorer]
    modes = [m.base.training for m in models]
    for m in models:
        m.base.eval()
    margins = []
    try:
        for k, batch in enumerate(batches):
            if max_batches and k >= max_batches:
                break
            batch = {key: t.to(device) for key, t in batch.items()}
            rewards = scorer.score(batch)
            margins.append(rewards[batch["better"]] - rewards[batch["worse"]])
    finally:
        for m, mode in zip(models, modes):
            m.base.train(mode)
    margins = torch.cat(margins)
    return {**pair_summary(margins), "loss": held_out_loss(margins)}


def pair_summary(margins: torch.Tensor) -> dict:
    """{"accuracy", "mean_margin", "n"} of per-pair margins (preferred minus dispreferred score)."""
    return {"accuracy": float(preference_accuracy(margins).mean()), "mean_margin": float(margins.float().mean()),
            "n": int(margins.numel())}


def held_out_loss(margins: torch.Tensor) -> float:
    """Mean −log σ(r⁺ − r⁻) over held-out pairs (no margins): the pairwise loss a reward model is trained on."""
    return float(pairwise_loss(margins.float(), torch.zeros_like(margins, dtype=torch.float32)).mean())
