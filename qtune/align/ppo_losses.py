"""PPO for language models, the pieces with math in them, each under the equation it implements.

Notation, per response token t of a sampled response y to prompt x (tensors (B, T) over the responses of a
rollout batch, `mask` 1 on real response tokens, which form a prefix of each row):

    logp_t      log π(y_t | x, y_<t)      under the policy being trained
    ref_logp_t  log π_ref(y_t | x, y_<t)  under the reference (the base with adapters switched off)
    V_t         the value model's estimate of the return from state (x, y_<t)

Following `qtune.align.preference_losses`, the losses return one value per token and leave the reduction to the caller,
which divides the sum over its micro-batches by the response tokens of the whole minibatch.
"""

import torch


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every token, plus the sequence's score on its last token.

        r_t = −β (log π(y_t) − log π_ref(y_t)) + [t = last token] · score

    (Ziegler et al. 2019, eq. 2; InstructGPT, Ouyang et al. 2022, eq. 2, without the pre-training term.)
    scores (B,); logp, ref_logp, mask (B, T). Rows need at least one response token. Returns (B, T), 0 off the mask.
    """
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - ref_logp) * mask  # (B, T)
    last = mask.sum(1).long() - 1  # (B,) index of each row's last response token
    if (last < 0).any():
        raise ValueError("every response needs at least one token to receive its score")
    rows = torch.arange(len(scores), device=scores.device)
    return rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eqs. 11-16), by the recursion

        δ_t = r_t + γ V_{t+1} − V_t        (V past the last token = 0: the response has ended)
        A_t = δ_t + γλ A_{t+1}
        R_t = A_t + V_t                    (the value model's regression target)

    rewards, values, mask (B, T), the mask a prefix of each row. Returns (advantages, returns), 0 off the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is nonzero (a 0-dim tensor)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries (population variance); 0 off the mask.

    With shift_mean=False only the scale changes, so the values keep their sign (the mean is added back).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_range: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, negated to be minimised (Schulman et al. 2017, arXiv:1707.06347, eq. 7):

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        loss_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)

    All inputs (B, T) (or any one shape). Returns (loss per token, clipped) where `clipped` is 1.0 where the
    clipped term is the one taken (its gradient is zero there), for the clip fraction.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logp.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The value loss with the value change clipped around the rollout's values (as in OpenAI's PPO2 and
    lm-human-preferences):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        loss_t = ½ max((V − R)², (V_clip − R)²)

    Returns (loss per token, clipped) with `clipped` 1.0 where the clipped error is the larger one.
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    error = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(error, error_clipped), (error_clipped > error).to(values.dtype)


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π_old ‖ π) from samples of π_old (Schulman's "k3"): (ρ − 1) − log ρ ≥ 0."""
    log_ratio = logp - old_logp
    return torch.expm1(log_ratio) - log_ratio


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """β steered so the policy's KL from the reference tracks a target (Ziegler et al. 2019, section 2.2):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t (1 + K_β e_t),   K_β = n_steps / horizon

    KL_t is the mean over the rollout batch of each response's Σ_t (log π − log π_ref), and n_steps the
    number of responses it came from: as in lm-human-preferences, the gain grows with the batch so that the
    horizon is counted in episodes. Too much KL raises β (a stronger pull back), too little lowers it.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        if beta <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs beta, target and horizon > 0 "
                             f"(got {beta}, {target}, {horizon})")
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        """Move β after a rollout batch whose mean sequence KL was `kl`; returns the new β."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
