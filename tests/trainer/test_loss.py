"""GRPO advantages and the clipped, truncated-IS policy loss, against hand-computed values.

Conventions in the comments: r = exp(logprob - behaviour_logprob) is the ratio, A the
advantage, clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28], is_cap 2.
"""

import math

import pytest
import torch

from trainer.loss import group_advantages, policy_loss

CLIP = dict(clip_low=0.2, clip_high=0.28, is_cap=2.0)


def lp(*ratios):
    """Log-probs whose ratio to a behaviour log-prob of 0 are `ratios`: one row."""
    return torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float32)


def run(ratios, advantage, mask=None):
    """policy_loss on one sequence with the given per-token ratios; returns loss, grad, stats."""
    logprobs = lp(*ratios).requires_grad_(True)
    behaviour = torch.zeros_like(logprobs)
    mask = torch.ones_like(logprobs) if mask is None else torch.tensor([mask], dtype=torch.float32)
    loss, stats = policy_loss(logprobs, behaviour, torch.tensor([advantage]), mask, **CLIP)
    loss.backward()
    return loss.item(), logprobs.grad[0].tolist(), stats


# ---- advantages -----------------------------------------------------------------------


def test_advantages_unscaled_are_reward_minus_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    # group 0: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; group 1: mean 2 -> [1, -1, 0, 0]
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, scale="none"), expected)


def test_advantages_scaled_by_population_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    # group 0: deviations [0.75, -0.25 x3]; population variance (0.5625 + 3 * 0.0625) / 4
    #   = 0.1875, std = sqrt(3)/4 = 0.4330 -> [0.75, -0.25] / 0.4330 = [sqrt(3), -1/sqrt(3)]
    # group 1: deviations [0.5, -0.5, 0.5, -0.5], std 0.5 -> [1, -1, 1, -1]
    s3 = math.sqrt(3)
    expected = torch.tensor([[s3, -1 / s3, -1 / s3, -1 / s3], [1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(group_advantages(rewards, scale="group"), expected, rtol=1e-5, atol=1e-5)
    # With the sample std (n - 1) group 1 would be +-0.866: make sure it is not.
    assert group_advantages(rewards, scale="group")[1, 0].item() == pytest.approx(0.5 / (0.5 + 1e-6))


def test_zero_variance_group_gives_exact_zeros():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, scale=scale)
        assert torch.equal(adv[:3], torch.zeros(3, 3))  # exactly 0, not 1e-10
        assert adv[3, 0].item() > 0


def test_single_group_as_a_vector():
    adv = group_advantages(torch.tensor([2.0, 0.0]), scale="none")  # mean 1 -> [1, -1]
    assert adv.tolist() == [1.0, -1.0]


# ---- policy loss: values --------------------------------------------------------------


def test_ratio_one_gives_minus_token_mean_advantage():
    # r = 1 everywhere -> obj = A per token. Row 0 has 3 tokens with A = 1, row 1 one
    # token with A = -0.5 (two padded): loss = -(3 * 1 + 1 * -0.5) / 4 = -0.625
    # (a per-sequence mean would give -(1 - 0.5) / 2 = -0.25).
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), torch.tensor([1.0, -0.5]), mask, **CLIP)
    assert loss.item() == pytest.approx(-0.625)
    assert stats == pytest.approx({"clip_frac": 0.0, "is_ratio_max": 1.0, "is_capped_frac": 0.0, "approx_kl": 0.0})


def test_token_inside_the_clip_range():
    # r = 1.1 in [0.8, 1.28], A = 2: obj = 1.1 * 2 = 2.2; d(-obj)/d logprob = -r * A = -2.2
    loss, grad, stats = run([1.1], 2.0)
    assert loss == pytest.approx(-2.2)
    assert grad == pytest.approx([-2.2])
    assert stats["clip_frac"] == 0.0


def test_token_clipped_high_with_positive_advantage():
    # r = 1.5 > 1.28, A = 1: min(1.5, 1.28) = 1.28, a constant: no gradient
    loss, grad, stats = run([1.5], 1.0)
    assert loss == pytest.approx(-1.28)
    assert grad == [0.0]
    assert stats["clip_frac"] == 1.0


def test_token_clipped_low_with_negative_advantage():
    # r = 0.5 < 0.8, A = -1: min(0.5 * -1, 0.8 * -1) = -0.8, a constant: no gradient
    loss, grad, stats = run([0.5], -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == [0.0]
    assert stats["clip_frac"] == 1.0


def test_low_ratio_with_positive_advantage_is_not_clipped():
    # r = 0.5, A = 1: min(0.5, 0.8) = 0.5 (unclipped); grad = -r * A = -0.5
    loss, grad, stats = run([0.5], 1.0)
    assert loss == pytest.approx(-0.5)
    assert grad == pytest.approx([-0.5])
    assert stats["clip_frac"] == 0.0


def test_high_ratio_below_cap_with_negative_advantage_is_not_clipped():
    # r = 1.5 < is_cap, A = -1: min(-1.5, -1.28) = -1.5 (unclipped); grad = -r * A = 1.5
    loss, grad, stats = run([1.5], -1.0)
    assert loss == pytest.approx(1.5)
    assert grad == pytest.approx([1.5])
    assert stats["clip_frac"] == 0.0
    assert stats["is_capped_frac"] == 0.0


def test_is_cap_bounds_a_huge_ratio_with_negative_advantage():
    # r = 10, A = -1. Uncapped PPO: min(-10, -1.28) = -10 -> loss 10, gradient 10.
    # Capped at 2: min(2 * -1, 1.28 * -1) = -2 -> loss 2, a constant: no gradient.
    loss, grad, stats = run([10.0], -1.0)
    assert loss == pytest.approx(2.0)
    assert grad == [0.0]
    assert stats["is_ratio_max"] == pytest.approx(10.0)  # the raw ratio, before the cap
    assert stats["is_capped_frac"] == 1.0
    assert stats["clip_frac"] == 0.0  # capped, not PPO-clipped: counted separately


def test_approx_kl_is_k3_mean_over_tokens():
    # k3 = (r - 1) - log r: r = 2 -> 1 - 0.693147 = 0.306853; r = 0.5 -> -0.5 + 0.693147 = 0.193147
    # mean over the 2 tokens = 0.25
    _, _, stats = run([2.0, 0.5], 0.0)
    assert stats["approx_kl"] == pytest.approx(0.25, abs=1e-6)


# ---- policy loss: masking and gradients -----------------------------------------------


def test_padded_tokens_do_not_count_even_with_garbage_logprobs():
    advantages = torch.tensor([1.0])
    behaviour = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    clean = torch.tensor([[math.log(1.1), 0.0, 0.0, 0.0]], requires_grad=True)
    # Padding holding huge or -inf values: exp would overflow, or 0 * inf = nan.
    garbage = torch.tensor([[math.log(1.1), 0.0, 80.0, -math.inf]], requires_grad=True)
    loss_clean, stats_clean = policy_loss(clean, behaviour, advantages, mask, **CLIP)
    loss_garbage, stats_garbage = policy_loss(garbage, behaviour, advantages, mask, **CLIP)
    # Tokens: r = 1.1 and r = 1, A = 1 -> loss = -(1.1 + 1) / 2 = -1.05
    assert loss_clean.item() == pytest.approx(-1.05)
    assert loss_garbage.item() == pytest.approx(-1.05)
    assert stats_garbage == pytest.approx(stats_clean)
    assert stats_garbage["is_ratio_max"] == pytest.approx(1.1)  # not e^80
    loss_garbage.backward()
    assert torch.isfinite(garbage.grad).all()
    assert garbage.grad[0, 2:].tolist() == [0.0, 0.0]


def test_gradient_flows_only_where_not_clipped():
    # One sequence, A = 1, four tokens, token mean over 4:
    #   r = 1.0  inside        -> grad -r*A/4 = -0.25
    #   r = 1.5  clipped high  -> 0
    #   r = 0.5  below range, A > 0: unclipped -> -0.5/4 = -0.125
    #   r = 3.0  capped at 2, and clipped -> 0
    # A second sequence, A = -1:
    #   r = 0.5  clipped low   -> 0
    #   r = 1.2  inside        -> -r*A/4 = +0.3
    #   r = 1.5  above range, A < 0: unclipped -> +0.375
    #   r = 3.0  capped        -> 0
    logprobs = torch.log(torch.tensor([[1.0, 1.5, 0.5, 3.0], [0.5, 1.2, 1.5, 3.0]])).requires_grad_(True)
    behaviour = torch.zeros(2, 4)
    mask = torch.ones(2, 4)
    loss, stats = policy_loss(logprobs, behaviour, torch.tensor([1.0, -1.0]), mask, **CLIP)
    loss.backward()
    expected = torch.tensor([[-0.25, 0.0, -0.125, 0.0], [0.0, 0.3, 0.375, 0.0]]) / 2  # 8 tokens, not 4
    torch.testing.assert_close(logprobs.grad, expected)
    # objectives: row 0: 1 + 1.28 + 0.5 + 1.28 = 4.06; row 1: -0.8 - 1.2 - 1.5 - 2 = -5.5
    # loss = -(4.06 - 5.5) / 8 = 0.18
    assert loss.item() == pytest.approx(0.18)
    # clipped: (0,1), (0,3), (1,0) -> 3 / 8; capped: the two r = 3 -> 2 / 8
    assert stats["clip_frac"] == pytest.approx(3 / 8)
    assert stats["is_capped_frac"] == pytest.approx(2 / 8)
    assert stats["is_ratio_max"] == pytest.approx(3.0)


def test_clip_against_proximal_keeps_every_tokens_gradient_weighted_by_the_capped_ratio():
    # The batch of test_gradient_flows_only_where_not_clipped, clipped against the
    # proximal policy (decoupled PPO): the gradient of token t is -w_t * A / 8 with
    # w = min(r, 2), including the tokens clipped or capped against the behaviour ratio.
    #   row 0, A = 1:  w = [1, 1.5, 0.5, 2]   -> [-1, -1.5, -0.5, -2] / 8
    #   row 1, A = -1: w = [0.5, 1.2, 1.5, 2] -> [0.5, 1.2, 1.5, 2] / 8
    logprobs = torch.log(torch.tensor([[1.0, 1.5, 0.5, 3.0], [0.5, 1.2, 1.5, 3.0]])).requires_grad_(True)
    loss, stats = policy_loss(logprobs, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), torch.ones(2, 4), **CLIP,
                              clip_against="proximal")
    loss.backward()
    expected = torch.tensor([[-1.0, -1.5, -0.5, -2.0], [0.5, 1.2, 1.5, 2.0]]) / 8
    torch.testing.assert_close(logprobs.grad, expected)
    # objective w * A: (1 + 1.5 + 0.5 + 2) - (0.5 + 1.2 + 1.5 + 2) = -0.2 -> loss 0.2 / 8
    assert loss.item() == pytest.approx(0.025)
    assert stats["clip_frac"] == 0.0  # the policy is its own proximal policy at the step's start
    assert stats["is_capped_frac"] == pytest.approx(2 / 8)
    assert stats["is_ratio_max"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="clip_against"):
        policy_loss(logprobs, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), torch.ones(2, 4), **CLIP,
                    clip_against="old")


def test_empty_mask_gives_zero_loss_not_nan():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3), **CLIP)
    assert loss.item() == 0.0
    assert stats == {"clip_frac": 0.0, "is_ratio_max": 0.0, "is_capped_frac": 0.0, "approx_kl": 0.0}
    loss.backward()
    assert logprobs.grad.abs().sum().item() == 0.0


def test_stats_are_python_floats():
    _, _, stats = run([1.1, 0.9], 1.0)
    assert set(stats) == {"clip_frac", "is_ratio_max", "is_capped_frac", "approx_kl"}
    assert all(type(v) is float for v in stats.values())
