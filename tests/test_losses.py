"""Preference losses against values computed by hand from their equations, plus their known invariants."""

import math

import pytest
import torch

from collections import defaultdict
from types import SimpleNamespace

from qtune.align.preference_losses import (cpo_loss, dpo_loss, kto_kl_estimate, kto_loss, listwise_loss, orpo_loss,
                                           pairwise_loss, pointwise_mse, preference_accuracy, simpo_loss)

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), written out independently of torch."""
    return math.log1p(math.exp(x))


def nll(x: float) -> float:
    """−log σ(x)."""
    return softplus(-x)


def values(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t]


# ----------------------------------------------------------------------------- reward-model losses

def test_pairwise_loss_by_hand_with_llama2_margin():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    margin = torch.tensor([0.0, 0.0, 0.5])
    # r⁺ − r⁻ − m = 1, 0, −2.5
    expected = [nll(1.0), LN2, nll(-2.5)]
    assert values(pairwise_loss(chosen, rejected, margin)) == pytest.approx(expected, rel=1e-6)
    assert values(pairwise_loss(chosen, rejected)) == pytest.approx([nll(1.0), LN2, nll(-2.0)], rel=1e-6)


def test_pairwise_loss_gradient_by_hand():
    # d/dr⁺ −log σ(d) = −σ(−d) = −1 / (1 + e^d), and the opposite for r⁻
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([-0.2], requires_grad=True)
    pairwise_loss(chosen, rejected, 0.1).sum().backward()
    d = 0.3 + 0.2 - 0.1
    assert float(chosen.grad) == pytest.approx(-1 / (1 + math.exp(d)), rel=1e-6)
    assert float(rejected.grad) == pytest.approx(1 / (1 + math.exp(d)), rel=1e-6)


def test_listwise_loss_by_hand_averages_each_ranking_over_its_pairs():
    # ranking 0: K = 3, rewards best first 3, 1, 2 -> pairs (0,1) d=2, (0,2) d=1, (1,2) d=−1
    # ranking 1: K = 2, rewards 0, 1, margin 0.5 -> d = −1.5; its third slot is padding
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 1e6]])
    lengths = torch.tensor([3, 2])
    margin = torch.tensor([0.0, 0.5])
    expected = [(nll(2.0) + nll(1.0) + nll(-1.0)) / 3, nll(-1.5)]
    assert values(listwise_loss(rewards, lengths, margin)) == pytest.approx(expected, rel=1e-6)


def test_listwise_loss_ignores_padding_values_and_their_gradients():
    base = torch.tensor([[0.5, -0.5, 7.0, -7.0]])
    losses = []
    for pad in (float("inf"), -1e9, 0.0):
        rewards = base.clone()
        rewards[0, 2:] = pad
        rewards.requires_grad_(True)
        loss = listwise_loss(rewards, torch.tensor([2]))
        loss.sum().backward()
        assert torch.isfinite(rewards.grad[0, :2]).all()
        losses.append(float(loss.detach()))
    assert losses == pytest.approx([nll(1.0)] * 3, rel=1e-6)


def test_listwise_loss_of_pairs_equals_pairwise_loss():
    torch.manual_seed(0)
    rewards = torch.randn(5, 2)
    margin = torch.rand(5)
    listwise = listwise_loss(rewards, torch.full((5,), 2), margin)
    torch.testing.assert_close(listwise, pairwise_loss(rewards[:, 0], rewards[:, 1], margin))


def test_pointwise_mse_by_hand():
    assert values(pointwise_mse(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 4.0]))) == [0.25, 4.0]


def test_preference_accuracy_counts_ties_as_half():
    assert values(preference_accuracy(torch.tensor([1.0, 0.0, -2.0, 1e-9]))) == [1.0, 0.5, 0.0, 1.0]


# ----------------------------------------------------------------------------- DPO family

# log π(y⁺) = −10, log π(y⁻) = −12, log π_ref(y⁺) = −11, log π_ref(y⁻) = −11.5, β = 0.5
# -> chosen log-ratio 1, rejected log-ratio −0.5, h = 1.5, βh = 0.75
LOGPS = dict(policy_chosen=torch.tensor([-10.0]), policy_rejected=torch.tensor([-12.0]),
             ref_chosen=torch.tensor([-11.0]), ref_rejected=torch.tensor([-11.5]))


def test_dpo_sigmoid_loss_and_implicit_rewards_by_hand():
    losses, chosen, rejected = dpo_loss(**LOGPS, beta=0.5)
    assert float(losses) == pytest.approx(nll(0.75), rel=1e-6)
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.25)


def test_conservative_dpo_by_hand():
    losses, _, _ = dpo_loss(**LOGPS, beta=0.5, label_smoothing=0.1)
    assert float(losses) == pytest.approx(0.9 * nll(0.75) + 0.1 * nll(-0.75), rel=1e-6)


def test_ipo_loss_by_hand():
    # (h − 1/(2β))² = (1.5 − 1)²
    losses, _, _ = dpo_loss(**LOGPS, beta=0.5, loss_type="ipo")
    assert float(losses) == pytest.approx(0.25, rel=1e-6)


def test_robust_dpo_by_hand():
    losses, _, _ = dpo_loss(**LOGPS, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert float(losses) == pytest.approx((0.9 * nll(0.75) - 0.1 * nll(-0.75)) / 0.8, rel=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    # Chowdhury et al. 2024: E over labels flipped with probability ε of the rDPO loss = the clean DPO loss.
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 3 for _ in range(4))
    eps, beta = 0.2, 0.3
    kept, _, _ = dpo_loss(pc, pr, rc, rr, beta, "robust", eps)
    flipped, _, _ = dpo_loss(pr, pc, rr, rc, beta, "robust", eps)
    clean, _, _ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.3)])
def test_dpo_loss_is_ln2_when_policy_equals_reference(loss_type, smoothing):
    logps = torch.tensor([-3.0, -40.0, -7.5])
    losses, chosen, rejected = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), 0.1, loss_type, smoothing)
    assert values(losses) == pytest.approx([LN2] * 3, rel=1e-6)
    assert values(chosen) == values(rejected) == [0.0] * 3


def test_ipo_loss_when_policy_equals_reference_is_its_target_squared():
    logps = torch.tensor([-3.0, -9.0])
    losses, _, _ = dpo_loss(logps, logps, logps, logps, 0.25, "ipo")
    assert values(losses) == pytest.approx([(1 / (2 * 0.25)) ** 2] * 2)


def test_dpo_gradient_by_hand():
    # d/d log π(y⁺) of −log σ(βh) = −β σ(−βh); the reference gets none (it is a constant)
    policy_chosen = torch.tensor([-10.0], requires_grad=True)
    losses, _, _ = dpo_loss(policy_chosen, LOGPS["policy_rejected"], LOGPS["ref_chosen"], LOGPS["ref_rejected"], 0.5)
    losses.sum().backward()
    assert float(policy_chosen.grad) == pytest.approx(-0.5 / (1 + math.exp(0.75)), rel=1e-6)


@pytest.mark.parametrize("kwargs,message", [(dict(beta=0.0), "beta"), (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
                                            (dict(beta=0.1, loss_type="hinge"), "hinge")])
def test_dpo_loss_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(**LOGPS, **kwargs)


# ----------------------------------------------------------------------------- reference-free: SimPO, CPO, ORPO

# chosen: 4 tokens, log π = −4, ℓ = −1; rejected: 2 tokens, log π = −4, ℓ = −2
CHOSEN_LOGP, REJECTED_LOGP = torch.tensor([-4.0]), torch.tensor([-4.0])
CHOSEN_MEAN, REJECTED_MEAN = CHOSEN_LOGP / 4, REJECTED_LOGP / 2


def log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(1 - math.exp(mean_logp))


def test_simpo_by_hand():
    # β ℓ⁺ − β ℓ⁻ − γ = 2·(−1) − 2·(−2) − 0.5 = 1.5: the longer chosen reply wins once lengths are normalised
    losses, chosen, rejected = simpo_loss(CHOSEN_MEAN, REJECTED_MEAN, beta=2.0, gamma=0.5)
    assert float(losses) == pytest.approx(nll(1.5), rel=1e-6)
    assert float(chosen) == -2.0 and float(rejected) == -4.0
    smoothed, _, _ = simpo_loss(CHOSEN_MEAN, REJECTED_MEAN, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(0.9 * nll(1.5) + 0.1 * nll(-1.5), rel=1e-6)


def test_simpo_is_ln2_at_equal_normalised_logps_without_margin():
    mean_logp = torch.tensor([-0.3, -2.0, -7.0])
    losses, _, _ = simpo_loss(mean_logp, mean_logp, beta=2.5, gamma=0.0)
    assert values(losses) == pytest.approx([LN2] * 3, rel=1e-6)


def test_cpo_by_hand():
    # equal sequence log-probs: −log σ(0) = ln 2, plus α · NLL(y⁺) = 1 · 1
    losses, chosen, rejected = cpo_loss(CHOSEN_LOGP, REJECTED_LOGP, -CHOSEN_MEAN, beta=0.5, alpha=1.0)
    assert float(losses) == pytest.approx(LN2 + 1.0, rel=1e-6)
    assert float(chosen) == float(rejected) == -2.0


def test_cpo_without_nll_is_dpo_against_a_uniform_reference():
    torch.manual_seed(0)
    pc, pr, nll_c = torch.randn(5) * 4, torch.randn(5) * 4, torch.rand(5)
    zero = torch.zeros(5)
    torch.testing.assert_close(cpo_loss(pc, pr, nll_c, 0.3, 0.0, 0.2)[0], dpo_loss(pc, pr, zero, zero, 0.3, "sigmoid", 0.2)[0])


def test_orpo_by_hand():
    lor = log_odds(-1.0) - log_odds(-2.0)
    losses, chosen, rejected = orpo_loss(CHOSEN_MEAN, REJECTED_MEAN, lam=0.1)
    assert float(losses) == pytest.approx(1.0 + 0.1 * nll(lor), rel=1e-6)  # NLL(y⁺) = −ℓ⁺ = 1
    assert float(chosen) == pytest.approx(-0.1) and float(rejected) == pytest.approx(-0.2)


def test_orpo_log_odds_stay_finite_near_probability_one():
    # ℓ → 0⁻ makes 1 − e^ℓ vanish; log(−expm1 ℓ) keeps it exact where log1p(−exp ℓ) would round to log 0
    losses, _, _ = orpo_loss(torch.tensor([-1e-9]), torch.tensor([-3.0]), lam=0.5)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("call,message", [(lambda: simpo_loss(CHOSEN_MEAN, REJECTED_MEAN, 0.0, 0.5), "beta"),
                                          (lambda: cpo_loss(CHOSEN_LOGP, REJECTED_LOGP, -CHOSEN_MEAN, -1.0, 1.0), "beta"),
                                          (lambda: orpo_loss(CHOSEN_MEAN, REJECTED_MEAN, 0.0), "lambda")])
def test_reference_free_losses_reject_bad_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# TRL's implementations of the same formulas, on the same log-probs. Its loss methods are trainer methods; they are
# called with a stand-in `self` holding only the attributes they read (building a trainer needs a model and data).
# TRL adds the NLL terms outside these methods (CPO: losses.mean() + cpo_alpha · nll, ORPO: nll − losses.mean(),
# the NLL a token mean over the batch's chosen replies), so that composition is written out here as TRL does it.

def trl_stand_in(**attributes) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **attributes)


def random_mean_logps(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    return -torch.rand(n) * 3 - 1e-3, -torch.rand(n) * 3 - 1e-3  # ℓ < 0


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_matches_trl(smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    chosen, rejected = random_mean_logps()
    trl = cpo.CPOTrainer.cpo_loss(trl_stand_in(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=smoothing),
                                  chosen, rejected)
    ours = simpo_loss(chosen, rejected, 2.0, 0.5, smoothing)
    for a, b in zip(ours, trl):
        torch.testing.assert_close(a, b)


def test_cpo_matches_trl():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    mean_chosen, mean_rejected = random_mean_logps()
    length = 5.0  # equal chosen lengths: TRL's batch token mean of the NLL equals the mean of per-reply means
    chosen, rejected = mean_chosen * length, mean_rejected * length * 1.3
    losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(
        trl_stand_in(loss_type="sigmoid", beta=0.1, simpo_gamma=0.5, label_smoothing=0.1), chosen, rejected)
    ours, ours_chosen, ours_rejected = cpo_loss(chosen, rejected, -mean_chosen, 0.1, 1.0, 0.1)
    torch.testing.assert_close(ours.mean(), losses.mean() + 1.0 * (-mean_chosen).mean())
    torch.testing.assert_close(ours_chosen, trl_chosen)
    torch.testing.assert_close(ours_rejected, trl_rejected)


def test_orpo_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    chosen, rejected = random_mean_logps()
    ratio_losses, trl_chosen, trl_rejected, _, _ = orpo.ORPOTrainer.odds_ratio_loss(trl_stand_in(beta=0.1), chosen, rejected)
    ours, ours_chosen, ours_rejected = orpo_loss(chosen, rejected, 0.1)
    torch.testing.assert_close(ours.mean(), (-chosen).mean() - ratio_losses.mean())
    torch.testing.assert_close(ours, -chosen - ratio_losses)
    torch.testing.assert_close(ours_chosen, trl_chosen)
    torch.testing.assert_close(ours_rejected, trl_rejected)


# ----------------------------------------------------------------------------- KTO

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
    # mismatched pairs: log π − log π_ref = 0.5, −0.1 -> z₀ = 0.2; r = 0.5 · (1, −0.5) = (0.5, −0.25)
    kl = kto_kl_estimate(torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -5.9]))
    assert float(kl) == pytest.approx(0.2, rel=1e-5)
    losses, rewards = kto_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.5]), torch.tensor([True, False]),
                               kl, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    assert values(rewards) == pytest.approx([0.5, -0.25])
    assert values(losses) == pytest.approx([1 - sigmoid(0.5 - 0.1), 1.5 * (1 - sigmoid(0.1 + 0.25))], rel=1e-5)


def test_kto_reference_point_is_never_negative_and_carries_no_gradient():
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    kl = kto_kl_estimate(policy, torch.tensor([-4.0, -4.0]))
    assert float(kl) == 0.0 and not kl.requires_grad


def test_kto_is_one_half_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -8.0, -1.0])
    losses, _ = kto_loss(logps, logps, torch.tensor([True, False, True]), kto_kl_estimate(logps, logps), 0.1)
    assert values(losses) == pytest.approx([0.5] * 3)


def test_kto_matches_trl():
    # TRL 1.x computes KTO inside KTOTrainer._compute_loss, from the model's outputs: it runs here with a stand-in
    # `self` and a stand-in model whose per-token log-probs sum to the chosen sequence log-probs (the reference
    # log-probs enter as TRL's precomputed ones).
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    torch.manual_seed(5)
    n, T = 6, 4
    policy, reference = -torch.rand(n) * 20, -torch.rand(n) * 20
    policy_mismatched, reference_mismatched = -torch.rand(n) * 5, -torch.rand(n) * 5 - 3  # z₀ > 0: no clamp
    desirable = torch.tensor([True, False, True, True, False, False])
    per_token = torch.zeros(n, T - 1)
    per_token[:, 0] = policy
    model = lambda **kwargs: SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, T - 1),  # noqa: E731
                                             mean_logits=torch.zeros(n, T - 1))
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=torch.device("cpu"),
                                                                          gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: policy_mismatched, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.0, undesirable_weight=1.4,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
             "completion_mask": torch.ones(n, T, dtype=torch.long), "label": desirable.clone(),
             "ref_logps": reference, "ref_KL_logps": reference_mismatched}
    trl_loss = kto.KTOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    kl = kto_kl_estimate(policy_mismatched, reference_mismatched)
    losses, rewards = kto_loss(policy, reference, desirable, kl, 0.3, 1.0, 1.4)
    assert float(kl) > 0
    torch.testing.assert_close(losses.mean(), trl_loss)
    assert stand_in._metrics["train"]["kl"] == [pytest.approx(float(kl))]
    assert stand_in._metrics["train"]["rewards/chosen"] == [pytest.approx(float(rewards[desirable].mean()))]
    assert stand_in._metrics["train"]["rewards/rejected"] == [pytest.approx(float(rewards[~desirable].mean()))]
