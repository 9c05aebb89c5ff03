"""The loss variants against hand-computed values: loss and gradient on a two-sequence
batch (lengths 2 and 1, advantages +1 and -1), for each aggregation, the sequence-level
ratio (GSPO), batch-scaled advantages, the entropy, and the truncation mask."""

import math

import pytest
import torch

from trainer.loss import LossNorm, aggregate, group_advantages, kl_penalty, policy_loss
from trainer.policy import TokenBatch, token_logprobs

MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])
WIDE = dict(clip_low=0.5, clip_high=0.5, is_cap=10.0)  # no clipping at these ratios


def loss_and_grad(log_ratio, **kwargs):
    behaviour = torch.tensor([[-1.0, -2.0], [-1.5, 0.0]])
    logprobs = (behaviour + log_ratio).clone().requires_grad_(True)
    loss, _ = policy_loss(logprobs, behaviour, ADV, MASK, **WIDE, **kwargs)
    loss.backward()
    return loss.item(), logprobs.grad


@pytest.mark.parametrize(
    "agg, norm, loss, grad",
    [
        # -(A0 + A0 + A1) / 3 tokens
        ("token_mean", None, -1 / 3, [[-1 / 3, -1 / 3], [1 / 3, 0.0]]),
        # -((A0 + A0) / 2 + A1 / 1) / 2 sequences
        ("seq_mean_token_mean", None, 0.0, [[-1 / 4, -1 / 4], [1 / 2, 0.0]]),
        # -(A0 + A0 + A1) / (2 sequences * 4 max tokens)
        ("seq_mean_token_sum_norm", LossNorm(tokens=3, seqs=2, max_tokens=4), -1 / 8, [[-1 / 8, -1 / 8], [1 / 8, 0.0]]),
    ],
)
def test_aggregations_at_ratio_one(agg, norm, loss, grad):
    value, g = loss_and_grad(torch.zeros(2, 2), loss_agg=agg, norm=norm)
    assert value == pytest.approx(loss, abs=1e-7)
    torch.testing.assert_close(g, torch.tensor(grad))


def test_sequence_ratio_is_gspo():
    # Token log-ratios [0.2, -0.4] and [0.3]: sequence ratios s0 = e^-0.1, s1 = e^0.3.
    log_ratio = torch.tensor([[0.2, -0.4], [0.3, 0.0]])
    s0, s1 = math.exp(-0.1), math.exp(0.3)
    value, g = loss_and_grad(log_ratio, loss_agg="seq_mean_token_mean", ratio_level="sequence")
    # GSPO: -(s0 * A0 + s1 * A1) / 2; d s_i / d logp_t = s_i / |y_i|.
    assert value == pytest.approx(-(s0 - s1) / 2, rel=1e-6)
    torch.testing.assert_close(g, torch.tensor([[-s0 / 4, -s0 / 4], [s1 / 2, 0.0]]))
    # The token ratio gives other values: the two are not the same objective.
    token_value, _ = loss_and_grad(log_ratio, loss_agg="seq_mean_token_mean", ratio_level="token")
    assert token_value != pytest.approx(value, rel=1e-3)


def test_sequence_ratio_is_clipped_per_sequence():
    # s0 = e^0.5 = 1.65 > 1 + 0.2 with A0 > 0: every token of sequence 0 is clipped.
    behaviour = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.5, 0.5], [0.0, 0.0]], requires_grad=True)
    loss, stats = policy_loss(logprobs, behaviour, ADV, MASK, clip_low=0.2, clip_high=0.2, is_cap=10.0,
                              loss_agg="seq_mean_token_mean", ratio_level="sequence")
    loss.backward()
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(-(1.2 * 1 + 1.0 * -1) / 2)
    assert logprobs.grad[0].abs().sum() == 0  # clipped: no gradient


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_shares_add_up_to_the_batch_loss(agg):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    behaviour = -torch.rand(4, 3)
    logprobs = behaviour + 0.1 * torch.randn(4, 3)
    adv = torch.tensor([0.5, -1.0, 2.0, 1.0])
    norm = LossNorm(tokens=6, seqs=3, max_tokens=5)
    whole, _ = policy_loss(logprobs, behaviour, adv, mask, **WIDE, norm=norm, loss_agg=agg)
    parts = sum(
        policy_loss(logprobs[i], behaviour[i], adv[i], mask[i], **WIDE, norm=norm, loss_agg=agg)[0]
        for i in (slice(0, 1), slice(1, 4))
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    assert aggregate(torch.ones(4, 3), mask, agg, norm).item() == pytest.approx(
        {"token_mean": 1.0, "seq_mean_token_mean": 1.0, "seq_mean_token_sum_norm": 6 / 15}[agg]
    )


def test_batch_scaled_advantages():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    std = math.sqrt(((0.5**2) * 2) / 4)  # population std of [1, 0, 0.5, 0.5]
    torch.testing.assert_close(
        group_advantages(rewards, scale="batch"), torch.tensor([[0.5 / (std + 1e-6), -0.5 / (std + 1e-6)], [0.0, 0.0]])
    )
    torch.testing.assert_close(group_advantages(rewards, scale="none"), torch.tensor([[0.5, -0.5], [0.0, 0.0]]))


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are given: [N, T, V]."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def test_entropy_of_the_next_token_distribution():
    v = 4
    logits = torch.zeros(1, 3, v)
    logits[0, 1] = torch.tensor([20.0, 0.0, 0.0, 0.0])  # nearly one-hot
    model = FixedLogits(logits)
    batch = TokenBatch.build([[1]], [[2, 3]], [[-1.0, -1.0]], pad_id=0, device="cpu")
    logprobs, entropy = token_logprobs(model, batch, temperature=1.0)
    assert entropy[0, 0].item() == pytest.approx(math.log(v))  # uniform
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert logprobs[0, 0].item() == pytest.approx(-math.log(v))
    assert not entropy.requires_grad  # logged only
    only_logprobs, none = token_logprobs(model, batch, temperature=1.0, with_entropy=False)
    assert none is None and torch.equal(only_logprobs, logprobs)
    peaked = torch.zeros(1, 3, v)
    peaked[0, 1, 0] = 2.0
    model = FixedLogits(peaked)
    _, with_grad = token_logprobs(model, batch, temperature=1.0, entropy_grad=True)
    (-with_grad[0, 1]).backward()  # a loss that rewards entropy...
    assert model.logits.grad[0, 1, 0].item() > 0  # ...pushes the peak logit down (descent: -grad)


def test_truncated_completions_can_be_left_out_of_the_loss():
    batch = TokenBatch.build(
        [[1], [1]], [[2, 3], [4, 5, 6]], [[-1.0, -1.0], [-1.0, -1.0, -1.0]], pad_id=0, device="cpu",
        in_loss=[True, False],
    )
    assert batch.num_tokens == 2
    assert batch.completion_mask[1].sum() == 0 and batch.completion_mask[0].sum() == 2


def test_kl_estimators():
    logprobs = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -2.0])  # log_r = [0.5, 0]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([0.125, 0.0]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([math.exp(-0.5) - 1 + 0.5, 0.0]))
    # k3's gradient pulls the policy back towards the reference: d/dlogp = 1 - exp(-log_r) > 0 here.
    lp = logprobs.clone().requires_grad_(True)
    kl_penalty(lp, ref, "k3").sum().backward()
    assert lp.grad[0].item() == pytest.approx(1 - math.exp(-0.5)) and lp.grad[1].item() == 0.0
