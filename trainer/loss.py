"""The GRPO loss: group-relative advantages and a token-level clipped objective.

In an asynchronous trainer the samples come from the rollout (behaviour) policy, whose
weights may be `max_staleness` versions old, and whose numerics (vLLM kernels, dtype)
differ from the trainer's. So the PPO ratio is taken against the behaviour log-probs
vLLM returned, and it is truncated at `is_cap` (truncated importance sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, scale: bool, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by the
    group's standard deviation.

    rewards: [num_groups, group_size], or [group_size] for a single group; the result
    has the same shape.

    The std is the population std (divide by group_size, not group_size - 1): the
    rewards are the whole group, not a sample of it, and it gives every group with
    two distinct rewards advantages of unit RMS (rewards [1, 0] -> [+1, -1], up to eps).
    A group whose rewards are all equal carries no signal and gets exactly 0, so the
    trainer can skip those rows."""
    r = rewards.float()
    mean = r.mean(dim=-1, keepdim=True)
    adv = r - mean
    if scale:
        adv = adv / (r.std(dim=-1, keepdim=True, correction=0) + eps)
    # Exact zeros: mean() of equal floats can be off by an ulp, and scaling would blow
    # that up to a spurious +-1e-10 advantage.
    constant = (r == r[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv)


def policy_loss(
    logprobs: Tensor,  # [N, L] policy log-prob of each sampled token (requires grad)
    behaviour_logprobs: Tensor,  # [N, L] log-prob of the same token under the rollout policy
    advantages: Tensor,  # [N] one per sequence
    mask: Tensor,  # [N, L] 1 for completion tokens, 0 for prompt and padding
    clip_low: float,
    clip_high: float,
    is_cap: float,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped policy-gradient loss with truncated importance sampling.

    Per token, with r = exp(logprobs - behaviour_logprobs) and A its sequence's advantage:
        r_cap = min(r, is_cap)                                  # truncated IS ratio
        obj   = min(r_cap * A, clip(r_cap, 1 - clip_low, 1 + clip_high) * A)
        loss  = -sum(obj * mask) / sum(mask)                    # mean over all tokens (DAPO)

    The cap matters for A < 0: there PPO's min picks the unclipped r * A, which grows
    without bound as r grows (one stale or numerically off token could dominate a
    step); capped, it is at most is_cap * |A| and carries no gradient (dual-clip PPO).
    For A > 0 the upper clip already bounds it.

    Every token of the batch counts equally, whatever its sequence's length.

    Stats (Python floats, over masked tokens):
      clip_frac       tokens where the clipped term is strictly the smaller one, i.e.
                      the PPO clip bounds the objective and blocks the gradient:
                      r_cap > 1 + clip_high with A > 0, or r_cap < 1 - clip_low with A < 0
      is_ratio_max    the largest raw (uncapped) ratio r
      is_capped_frac  tokens with r > is_cap
      approx_kl       mean of (r - 1) - log r: the k3 estimator of KL(behaviour || policy)
                      on tokens sampled from the behaviour policy (>= 0, low variance)
    """
    valid = mask > 0
    # Zero the log-ratio outside the mask before exp: padding may hold anything (even
    # -inf), and exp of garbage times a zero mask would still be nan.
    log_ratio = torch.where(valid, logprobs - behaviour_logprobs, torch.zeros_like(logprobs))  # [N, L]
    ratio = torch.exp(log_ratio)  # [N, L]
    capped = torch.clamp(ratio, max=is_cap)  # [N, L]
    adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [N, 1]
    unclipped_obj = capped * adv  # [N, L]
    clipped_obj = torch.clamp(capped, 1.0 - clip_low, 1.0 + clip_high) * adv  # [N, L]
    obj = torch.minimum(unclipped_obj, clipped_obj)  # [N, L]
    m = mask.to(obj.dtype)
    num_tokens = m.sum().clamp(min=1.0)
    loss = -(obj * m).sum() / num_tokens

    with torch.no_grad():
        n = num_tokens
        r = ratio.detach()
        stats = torch.stack(
            [
                ((clipped_obj < unclipped_obj) & valid).sum() / n,
                torch.where(valid, r, torch.zeros_like(r)).max(),
                ((r > is_cap) & valid).sum() / n,
                (((r - 1.0) - log_ratio.detach()) * m).sum() / n,
            ]
        ).tolist()  # one device sync for all four
    names = ("clip_frac", "is_ratio_max", "is_capped_frac", "approx_kl")
    return loss, dict(zip(names, stats))
