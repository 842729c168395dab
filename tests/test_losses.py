"""Preference losses against values computed by hand from their equations, plus their known invariants."""

import math

import pytest
import torch

from qtune.align.preference_losses import dpo_loss, listwise_loss, pairwise_loss, pointwise_mse, preference_accuracy

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
