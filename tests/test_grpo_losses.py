"""GRPO's advantages and objective (qtune.align.grpo_losses) against hand-computed values, invariants, and TRL's
GRPOTrainer._compute_loss run on the same log-probs (TRL is a test-only extra)."""

import collections
import math
from types import SimpleNamespace

import pytest
import torch

from qtune.align.grpo_losses import (STD_EPS, clipped_surrogate, group_advantages, informative_groups, k3_kl,
                                     loss_weights, overlong_penalty)


# ----------------------------------------------------------------------------- advantages

def test_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    std0 = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    std1 = math.sqrt((2.25**2 + 3 * 0.75**2) / 3)  # of (3, 0, 0, 0), mean 0.75
    torch.testing.assert_close(group_advantages(rewards, "grpo"), torch.tensor([
        [0.5 / (std0 + STD_EPS), -0.5 / (std0 + STD_EPS), -0.5 / (std0 + STD_EPS), 0.5 / (std0 + STD_EPS)],
        [2.25 / (std1 + STD_EPS), -0.75 / (std1 + STD_EPS), -0.75 / (std1 + STD_EPS), -0.75 / (std1 + STD_EPS)]]))
    torch.testing.assert_close(group_advantages(rewards, "dr_grpo"),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [2.25, -0.75, -0.75, -0.75]]))
    # leave-one-out: r_i minus the mean of the other three
    torch.testing.assert_close(group_advantages(rewards, "rloo"),
                               torch.tensor([[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], [3.0, -1.0, -1.0, -1.0]]))


def test_rloo_is_the_leave_one_out_baseline():
    rewards = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    others = (rewards.sum(1, keepdim=True) - rewards) / 5
    torch.testing.assert_close(group_advantages(rewards, "rloo"), rewards - others)


def test_grpo_std_matches_trl_nanstd():
    utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    std = utils.nanstd(rewards, dim=1, keepdim=True)
    want = (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, "grpo"), want)


def test_all_equal_groups_are_uninformative_and_have_zero_advantage():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    assert informative_groups(rewards).tolist() == [False, True, False]
    for kind in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages(rewards, kind)[[0, 2]].abs().max() == 0


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(3, 1), "grpo")


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    # L_max = 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 from 10 on
    assert overlong_penalty(lengths, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 6


# ----------------------------------------------------------------------------- objective

def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))  # ratios 0.5, 0.9, 1.1, 1.5
    loss, low, high = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    # A > 0: min(ρ, clip(ρ, 0.8, 1.28)) -> 0.5 (unclipped is smaller), 0.9, 1.1, 1.28 (clipped high)
    torch.testing.assert_close(loss, -torch.tensor([[0.5, 0.9, 1.1, 1.28]]))
    assert high.tolist() == [[0, 0, 0, 1]] and low.tolist() == [[0, 0, 0, 0]]
    loss, low, high = clipped_surrogate(logp, old, torch.tensor([-2.0]), 0.2, 0.28)
    # A < 0: min(−2ρ, −2 clip(ρ)) -> −2·0.8 for ρ = 0.5 (clipped low), −2ρ elsewhere
    torch.testing.assert_close(loss, torch.tensor([[1.6, 1.8, 2.2, 3.0]]))
    assert low.tolist() == [[1, 0, 0, 0]] and high.tolist() == [[0, 0, 0, 0]]


def test_ratio_one_gives_the_policy_gradient():
    """At ρ = 1 (first pass, old = logp) the loss is −A per token and its gradient −A, nothing clipped."""
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    A = torch.tensor([1.0, -0.5, 2.0])
    loss, low, high = clipped_surrogate(logp, logp.detach(), A, 0.2, 0.28)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), -A[:, None].expand(3, 5))
    torch.testing.assert_close(logp.grad, -A[:, None].expand(3, 5))
    assert low.sum() == 0 and high.sum() == 0


def test_k3_kl():
    logp = torch.log(torch.tensor([0.2, 0.5]))
    ref = torch.log(torch.tensor([0.4, 0.5]))
    # ρ = π_ref / π = 2 and 1: (ρ − 1) − log ρ
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([1 - math.log(2), 0.0]))
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert (k3_kl(x, x) == 0).all() and (k3_kl(x, x.flip(0)) >= 0).all()


def test_loss_weights_over_pieces_add_up_to_the_whole_batch():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    loss = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    n_tokens = int(mask.sum())
    want = {"token": (loss * mask).sum() / n_tokens,
            "sequence": ((loss * mask).sum(1) / mask.sum(1)).mean(),
            "constant": (loss * mask).sum() / (4 * 6)}
    for normalization, value in want.items():
        pieces = sum((loss[r] * loss_weights(mask[r], normalization, n_tokens, 4, 6)).sum() for r in ([0, 1], [2, 3]))
        torch.testing.assert_close(pieces, value)


# ----------------------------------------------------------------------------- against TRL

def trl_grpo_loss(loss_type: str, logp, old, ref, advantages, mask, beta, clip_low, clip_high, max_len):
    """TRL's GRPOTrainer._compute_loss with a stand-in trainer whose model returns the given log-probs."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    identity = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                               gather_for_metrics=lambda x: x, device=torch.device("cpu"))
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=clip_low, epsilon_high=clip_high, use_vllm=False, aux_loss_enabled=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), accelerator=identity)
    S, T = logp.shape
    inputs = {"prompt_ids": torch.ones(S, 2, dtype=torch.long), "prompt_mask": torch.ones(S, 2, dtype=torch.long),
              "completion_ids": torch.ones(S, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)


@pytest.mark.parametrize("loss_type, normalization", [("bnpo", "token"), ("grpo", "sequence"),
                                                      ("dr_grpo", "constant")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_objective_matches_trl(loss_type, normalization, beta):
    g = torch.Generator().manual_seed(5)
    S, T, max_len = 6, 7, 9
    old = -torch.rand(S, T, generator=g) * 3
    logp = old + 0.5 * torch.randn(S, T, generator=g)  # ratios on both sides of both clips
    ref = old + 0.2 * torch.randn(S, T, generator=g)
    lengths = torch.tensor([7, 6, 5, 7, 2, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]) * (0.5 + torch.rand(S, generator=g))
    loss, low, high = clipped_surrogate(logp, old, advantages, 0.2, 0.28)
    loss = loss + beta * k3_kl(logp, ref)
    ours = (loss * loss_weights(mask, normalization, int(mask.sum()), S, max_len)).sum()
    theirs = trl_grpo_loss(loss_type, logp, old, ref, advantages, mask, beta, 0.2, 0.28, max_len)
    torch.testing.assert_close(ours, theirs)
    assert 0 < (low * mask).sum() and 0 < (high * mask).sum()  # both clips were exercised
