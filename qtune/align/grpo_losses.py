"""Critic-free RL for language models (GRPO and its fixes): the pieces with math in them, each under its equation.

For each prompt a group of G responses is sampled and scored; a response's advantage compares its reward with
the others of its group, so no value model is needed. Notation, per response token t (tensors (S, T) over the
S responses of a batch, `mask` 1 on real response tokens):

    logp_t      log π_θ(y_t | x, y_<t)      the policy being trained
    old_logp_t  log π_old(y_t | x, y_<t)    the policy that sampled the batch
    ref_logp_t  log π_ref(y_t | x, y_<t)    the reference (the base with adapters switched off)

As in `qtune.align.ppo_losses`, the losses return one value per token; `loss_weights` says how the caller
reduces them, so summing micro-batch pieces equals the loss of the whole minibatch.
"""

import torch

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
STD_EPS = 1e-4  # added to the group std before dividing (the value TRL uses)


def group_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """One advantage per response from the rewards of its group, (P, G) -> (P, G):

        grpo     A_i = (r_i − mean(r)) / (std(r) + 1e-4)     (Shao et al. 2024, DeepSeekMath; std with G − 1)
        dr_grpo  A_i = r_i − mean(r)                          (Liu et al. 2025, "Understanding R1-Zero-like training")
        rloo     A_i = r_i − mean_{j ≠ i} r_j = G/(G−1) (r_i − mean(r))   (Ahmadian et al. 2024, leave-one-out)
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage {kind!r} is not one of {', '.join(ADVANTAGES)}")
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"a group needs at least 2 responses to compare, got {G}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if kind == "grpo":
        return centred / (rewards.std(1, keepdim=True) + STD_EPS)
    if kind == "rloo":
        return centred * G / (G - 1)
    return centred


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P,) True where a group's rewards differ: an all-equal group has advantage 0 everywhere and no gradient
    (DAPO's dynamic sampling drops it, Yu et al. 2025)."""
    return rewards.amax(1) > rewards.amin(1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward; lengths (S,) in tokens:

        0                                  |y| ≤ L_max − L_buffer
        ((L_max − L_buffer) − |y|) / L_buffer   L_max − L_buffer < |y| ≤ L_max
        −1                                 |y| > L_max
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    free = max_len - buffer
    penalty = (free - lengths.float()) / buffer
    return penalty.clamp(min=-1.0, max=0.0)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped objective with separate bounds (DAPO's clip-higher), negated to be minimised:

        ρ_t = exp(log π_θ(y_t) − log π_old(y_t))
        loss_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)

    logp, old_logp (S, T); advantages (S,) per response. Returns (loss per token, low_clipped, high_clipped),
    the last two 1.0 where the clip binds: ρ < 1 − ε_low with A < 0, ρ > 1 + ε_high with A > 0.
    """
    A = advantages.to(logp.dtype)[:, None]  # (S, 1)
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
    low = ((ratio < 1 - clip_low) & (A < 0)).to(logp.dtype)
    high = ((ratio > 1 + clip_high) & (A > 0)).to(logp.dtype)
    return loss, low, high


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's k3, as GRPO uses it):

        exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1  ≥ 0, and 0 where the two agree.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


def loss_weights(mask: torch.Tensor, normalization: str, n_tokens: int, n_responses: int, max_len: int
                 ) -> torch.Tensor:
    """The weight of each token's loss in a minibatch of `n_responses` responses with `n_tokens` response tokens
    (this (S, T) piece may be part of it), so that loss = Σ_t weight_t · loss_t:

        token      1 / n_tokens                      every token counts the same (DAPO; TRL's "bnpo")
        sequence   1 / (|y| · n_responses)           mean over responses of each one's token mean (GRPO)
        constant   1 / (n_responses · max_len)       no length normalisation (Dr. GRPO)
    """
    mask = mask.float()
    if normalization == "token":
        return mask / max(n_tokens, 1)
    if normalization == "sequence":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * n_responses)
    if normalization == "constant":
        return mask / (n_responses * max_len)
    raise ValueError(f"loss normalisation {normalization!r} is not token, sequence or constant")
