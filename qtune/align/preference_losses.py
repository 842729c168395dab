"""Preference losses for reward models and DPO, each under the equation it implements.

Every loss returns one value per element (pair, ranking or response) and leaves the reduction to the
caller: a training step divides the sum over its micro-batches by the number of elements of the whole
accumulated step, so accumulation equals one large batch.

Notation: r⁺ / r⁻ are the rewards of the preferred / dispreferred response; for DPO,
h = [log π(y⁺|x) − log π_ref(y⁺|x)] − [log π(y⁻|x) − log π_ref(y⁻|x)] with sequence log-probabilities;
ℓ(y) = log π(y|x) / |y| is the length-normalised (mean per-token) log-probability of a response.
"""

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "robust")
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "orpo")  # these never need log π_ref


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss per pair, with Llama 2's preference-strength margin m:

        loss = −log σ(r⁺ − r⁻ − m)

    (InstructGPT, Ouyang et al. 2022, eq. 1; Llama 2, Touvron et al. 2023, eq. 2). All inputs (P,); returns (P,).
    """
    return -F.logsigmoid(chosen - rejected - margin)


def listwise_loss(rewards: torch.Tensor, lengths: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """InstructGPT's loss for K-way rankings: the mean over a ranking's K(K−1)/2 pairs of the pairwise loss,

        loss_g = 1 / C(K_g, 2) · Σ_{i<j<K_g} −log σ(r_{g,i} − r_{g,j} − m_g)

    so every ranking weighs the same however many responses it has (Ouyang et al. 2022, eq. 1).
    rewards (G, K) best first, entries at or past lengths[g] are padding; lengths (G,) >= 2; margin scalar or (G,).
    Returns (G,).
    """
    G, K = rewards.shape
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)  # every pair i < j, (P,) each
    valid = j[None, :] < lengths[:, None]  # (G, P); j < K_g implies i < K_g
    margin = torch.as_tensor(margin, dtype=rewards.dtype, device=rewards.device).reshape(-1, 1)
    pair_losses = -F.logsigmoid(rewards[:, i] - rewards[:, j] - margin)  # (G, P)
    pair_losses = torch.where(valid, pair_losses, 0.0)  # padding may hold anything, even inf
    return pair_losses.sum(1) / valid.sum(1)


def pointwise_mse(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Regression on absolute quality scores: loss = (r − s)², per response. (N,) -> (N,)."""
    return (rewards - scores) ** 2


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference losses from sequence log-probabilities (P,) each; returns (losses, r⁺, r⁻), all (P,).

    The implicit rewards r = β (log π(y|x) − log π_ref(y|x)) are returned detached, for logging.

    sigmoid  DPO (Rafailov et al. 2023, eq. 7); with label smoothing ε it is conservative DPO (cDPO, Mitchell 2023),
             the cross-entropy against labels flipped with probability ε:
                 −(1 − ε) log σ(βh) − ε log σ(−βh)
    ipo      IPO (Azar et al. 2023, eq. 17), β in the role of the paper's τ; it regresses h onto 1/(2β)
             instead of pushing it to infinity:
                 (h − 1/(2β))²
    robust   rDPO (Chowdhury et al. 2024, arXiv:2403.00409, section 3), unbiased under labels flipped with probability ε < 1/2:
                 [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def _smoothed_logsigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1 − ε) log σ(z) − ε log σ(−z): the cDPO cross-entropy against labels flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def simpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): no reference model; the reward is the length-normalised
    log-probability and the Bradley-Terry margin must exceed a target γ:

        loss = −log σ(β ℓ(y⁺) − β ℓ(y⁻) − γ)        r = β ℓ(y)

    ℓ (P,) each; label smoothing ε as in cDPO (TRL's CPOTrainer offers the same). Returns (losses, r⁺, r⁻), (P,).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen, rejected = beta * chosen_mean_logp, beta * rejected_mean_logp
    losses = _smoothed_logsigmoid_loss(chosen - rejected - gamma, label_smoothing)
    return losses, chosen.detach(), rejected.detach()


def cpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_nll: torch.Tensor, beta: float,
             alpha: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO (Xu et al. 2024, arXiv:2401.08417, eq. 3-5): DPO with the reference dropped (a uniform prior), plus a
    behaviour-cloning NLL term on the chosen response:

        loss = −log σ(β log π(y⁺|x) − β log π(y⁻|x)) + α NLL(y⁺)        r = β log π(y|x)

    Sequence log-probs (P,); chosen_nll (P,) is the chosen response's mean per-token NLL, −ℓ(y⁺) (TRL averages
    it over all chosen tokens of the batch instead, the same when chosen lengths are equal). Returns (losses, r⁺, r⁻).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen, rejected = beta * chosen_logp, beta * rejected_logp
    losses = _smoothed_logsigmoid_loss(chosen - rejected, label_smoothing) + alpha * chosen_nll
    return losses, chosen.detach(), rejected.detach()


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eq. 6-9): the SFT loss on the chosen response plus λ times an
    odds-ratio term, with odds(y|x) = P / (1 − P) of the length-normalised likelihood P = exp ℓ(y):

        log OR = [ℓ(y⁺) − log(1 − e^ℓ(y⁺))] − [ℓ(y⁻) − log(1 − e^ℓ(y⁻))]
        loss   = −ℓ(y⁺) − λ log σ(log OR)                  r = λ ℓ(y)   (TRL's logged rewards)

    ℓ (P,) each, all < 0. log(1 − e^ℓ) is computed as log(−expm1(ℓ)), exact where ℓ is near 0. Returns (losses, r⁺, r⁻).
    """
    if lam <= 0:
        raise ValueError(f"orpo lambda must be positive, got {lam}")
    log_odds = (chosen_mean_logp - torch.log(-torch.expm1(chosen_mean_logp))) \
        - (rejected_mean_logp - torch.log(-torch.expm1(rejected_mean_logp)))
    losses = -chosen_mean_logp - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean_logp.detach(), lam * rejected_mean_logp.detach()


def kto_kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, arXiv:2402.01306, section 4.1): a biased but cheap estimate of
    KL(π ‖ π_ref) from mismatched pairs (x, y′), each prompt with another record's completion,

        z₀ = max(0, mean_(x, y′) [log π(y′|x) − log π_ref(y′|x)])

    held constant (detached), as the paper and TRL do. Sequence log-probs (M,) each; returns a scalar.
    """
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired completions, with r = β (log π(y|x) − log π_ref(y|x)):

        desirable y:    λ_D (1 − σ(r − β z₀))
        undesirable y:  λ_U (1 − σ(β z₀ − r))

    policy / reference sequence log-probs (N,), desirable (N,) bool, kl = z₀ (see `kto_kl_estimate`).
    Returns (losses, r), (N,) each; r detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    rewards = beta * (policy - reference)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(rewards - beta * kl)),
                         undesirable_weight * (1 - torch.sigmoid(beta * kl - rewards)))
    return losses, rewards.detach()


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the preferred response scores higher (margin > 0), 0 when lower, 1/2 for a tie.

    Counting ties as half keeps a scorer that cannot tell responses apart (a fresh DPO adapter, whose implicit
    rewards are all 0) at chance, 0.5, instead of 0.
    """
    return (margins > 0).float() + 0.5 * (margins == 0).float()
