"""PPO's losses, advantages and KL controller against hand-computed values and direct definitions."""

import math

import pytest
import torch

from qtune.align.ppo_losses import (AdaptiveKLController, FixedKLController, approx_kl, clipped_policy_loss,
                                    clipped_value_loss, gae, kl_penalized_rewards, masked_mean, whiten)


def gae_by_definition(rewards, values, lengths, gamma, lam):
    """A_t = Σ_{l >= 0} (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t with V = 0 after the last token (eq. 16)."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        v = [float(values[b, t]) for t in range(n)] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return advantages


def test_gae_hand_computed():
    # δ2 = 1 − 0.1 = 0.9, A2 = 0.9; δ1 = 0.1 − 0.2 = −0.1, A1 = −0.1 + 0.5·0.9 = 0.35;
    # δ0 = 0.2 − 0.5 = −0.3, A0 = −0.3 + 0.5·0.35 = −0.125; R = A + V
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.125, 0.35, 0.9]]))
    torch.testing.assert_close(ret, torch.tensor([[0.375, 0.55, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_the_sum_over_future_deltas(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    # Junk beyond each row's end must be ignored.
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = gae_by_definition(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


def test_gae_with_lambda_one_gives_discounted_returns():
    rewards = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    values = torch.tensor([[9.0, -4.0, 2.0, 7.0]])
    _, ret = gae(rewards, values, torch.ones(1, 4), gamma=0.5, lam=1.0)
    # R_t = Σ_k γ^k r_{t+k}, whatever the values
    expected = [1 - 2 * 0.5 + 3 * 0.25 + 0.5 * 0.125, -2 + 3 * 0.5 + 0.5 * 0.25, 3 + 0.5 * 0.5, 0.5]
    torch.testing.assert_close(ret, torch.tensor([expected]))


def test_kl_penalized_rewards_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    # row 0: −0.1·(0.5, −1, 0) and +2 on the last token; row 1: −0.1·1 − 1 on its only token, nothing after
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-1.1, 0.0, 0.0]]))


def test_kl_penalized_rewards_need_a_token():
    with pytest.raises(ValueError, match="at least one token"):
        kl_penalized_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_clipped_policy_loss_hand_computed():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.tensor([-1.0, -2.0, -0.3, -4.0, -1.0])
    logp = (old + ratio.log()).requires_grad_()
    loss, clipped = clipped_policy_loss(logp, old, adv, clip_range=0.2)
    # −min(ρA, clip(ρ, 0.8, 1.2) A): (−1.5, −1.2) -> −1.2 clipped; (1.5, 1.2) -> 1.5; (−0.5, −0.8) -> −0.5;
    # (0.5, 0.8) -> 0.8 clipped; (−2.2, −2.2) -> −2.2
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))
    loss.sum().backward()
    # d/dlogp (−ρA) = −ρA where unclipped, 0 where the clipped (constant) term is taken
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2]))


def test_clipped_policy_loss_is_minus_advantage_when_policy_is_unchanged():
    adv = torch.randn(3, 4)
    logp = torch.randn(3, 4)
    loss, clipped = clipped_policy_loss(logp, logp, adv, 0.2)
    torch.testing.assert_close(loss, -adv)
    assert clipped.sum() == 0


def test_clipped_value_loss_hand_computed():
    old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    returns = torch.tensor([2.0, 0.0, 2.0, 2.0])
    values = torch.tensor([1.5, 0.5, 1.1, 2.5], requires_grad=True)
    loss, clipped = clipped_value_loss(values, old, returns, clip_range=0.2)
    # V_clip = (1.2, 0.8, 1.1, 1.2); ½ max((V − R)², (V_clip − R)²)
    # = ½ max(.25, .64), ½ max(.25, .64), ½ max(.81, .81), ½ max(.25, .64)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.32, 0.32, 0.405, 0.32]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    loss.sum().backward()
    # The clipped error is constant in V (zero gradient); where unclipped, d/dV ½(V − R)² = V − R
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.0, -0.9, 0.0]))


def test_approx_kl():
    logp, old = torch.tensor([math.log(2.0), 0.0]), torch.tensor([0.0, 0.0])
    torch.testing.assert_close(approx_kl(logp, old), torch.tensor([1.0 - math.log(2.0), 0.0]))


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, population variance 2
    expected = (kept - 3) / math.sqrt(2 + 1e-8)
    torch.testing.assert_close(w[mask.bool()], expected)
    assert (w[~mask.bool()] == 0).all()
    torch.testing.assert_close(masked_mean(whiten(x, mask, shift_mean=False), mask), torch.tensor(3.0))


def test_adaptive_kl_controller_hand_computed():
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    # e = clip(9/6 − 1, ±0.2) = 0.2: β = 0.1 · (1 + 0.2 · 100/10000)
    assert c.update(9.0, 100) == pytest.approx(0.1 * 1.002)
    # e = 6.6/6 − 1 = 0.1 (inside the clip)
    assert c.update(6.6, 100) == pytest.approx(0.1 * 1.002 * 1.001)
    # KL of 0: e = −1 clipped to −0.2; a batch of 500 episodes moves β five times as far
    assert c.update(0.0, 500) == pytest.approx(0.1 * 1.002 * 1.001 * 0.99)
    # At the target β stays put
    before = c.beta
    assert c.update(6.0, 100) == pytest.approx(before)


def test_adaptive_kl_controller_state_and_checks():
    c = AdaptiveKLController(0.2, 1.0, 50)
    for kl in (3.0, 2.0, 0.5):
        c.update(kl, 10)
    d = AdaptiveKLController(0.2, 1.0, 50)
    d.load_state_dict(c.state_dict())
    assert d.update(4.0, 10) == c.update(4.0, 10)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)
