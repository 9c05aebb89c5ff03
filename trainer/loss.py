"""The GRPO loss: group-relative advantages and a token-level clipped objective.

In an asynchronous trainer the samples come from the rollout (behaviour) policy, whose
weights may be `max_staleness` versions old, and whose numerics (vLLM kernels, dtype)
differ from the trainer's. So the ratio is taken against the behaviour log-probs vLLM
returned, and it is truncated at `is_cap` (truncated importance sampling). Where the PPO
clip applies is a choice (`clip_against`): to that same ratio, or to the policy's own
change since the weights that began this step (decoupled PPO).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by a std per `scale`:

      "group"  the group's std (GRPO, DAPO)
      "batch"  the std of every reward in the batch (TRL's scale_rewards="batch"; a group
               with a small spread does not get its noise blown up to unit size)
      "none"   no division (Dr.GRPO, Liu et al. 2025: the std scaling biases towards
               groups that are nearly all right or all wrong)

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
    if scale == "group":
        adv = adv / (r.std(dim=-1, keepdim=True, correction=0) + eps)
    elif scale == "batch":
        adv = adv / (r.std(correction=0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    # Exact zeros: mean() of equal floats can be off by an ulp, and scaling would blow
    # that up to a spurious +-1e-10 advantage.
    constant = (r == r[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv)


@dataclasses.dataclass(frozen=True)
class LossNorm:
    """Sizes of the whole batch, so that a micro-batch's loss is its exact share of the
    batch loss and the shares add up over micro-batches."""

    tokens: int  # completion tokens in the loss, over the batch
    seqs: int  # sequences with at least one token in the loss, over the batch
    max_tokens: int  # gen.max_tokens: Dr.GRPO's constant normalizer


def aggregate(values: Tensor, mask: Tensor, agg: str, norm: LossNorm) -> Tensor:
    """This micro-batch's share of a batch-level aggregate of per-token `values` [N, L]:

      token_mean               sum(values) / batch tokens: every token counts the same
                               (DAPO, Yu et al. 2025; verl's "token-mean")
      seq_mean_token_mean      mean over sequences of each sequence's token mean: every
                               sequence counts the same (the GRPO paper, Shao et al. 2024)
      seq_mean_token_sum_norm  sum(values) / (batch sequences * gen.max_tokens): token
                               sums over a constant, no length bias (Dr.GRPO, Liu et al.
                               2025; verl's "seq-mean-token-sum-norm")
    """
    m = mask.to(values.dtype)
    if agg == "token_mean":
        return (values * m).sum() / max(norm.tokens, 1)
    if agg == "seq_mean_token_mean":
        per_seq = (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(norm.seqs, 1)
    if agg == "seq_mean_token_sum_norm":
        return (values * m).sum() / (max(norm.seqs, 1) * norm.max_tokens)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy
    (Schulman, "Approximating KL divergence", 2020), with log_r = logprobs - ref_logprobs:

      k1  log_r                        unbiased, high variance, can be negative
      k2  log_r^2 / 2                  biased, low variance, >= 0
      k3  exp(-log_r) - 1 + log_r      unbiased, low variance, >= 0 (GRPO paper, verl's
                                       "low_var_kl")
    """
    log_r = logprobs - ref_logprobs
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.exp(-log_r) - 1.0 + log_r
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")


def policy_loss(
    logprobs: Tensor,  # [N, L] policy log-prob of each sampled token (requires grad)
    behaviour_logprobs: Tensor,  # [N, L] log-prob of the same token under the rollout policy
    advantages: Tensor,  # [N] one per sequence
    mask: Tensor,  # [N, L] 1 for completion tokens in the loss, 0 for prompt and padding
    clip_low: float,
    clip_high: float,
    is_cap: float,
    norm: LossNorm | None = None,  # the whole batch's sizes; None: this batch is the whole
    loss_agg: str = "token_mean",
    ratio_level: str = "token",
    clip_against: str = "behaviour",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with truncated importance sampling; returns this
    batch's share of the batch loss (see `aggregate`) and stats.

    Per token, with r the importance ratio (policy / behaviour) and A its sequence's
    advantage, clip_against="behaviour":
        r_cap = min(r, is_cap)                                  # truncated IS ratio
        obj   = min(r_cap * A, clip(r_cap, 1 - clip_low, 1 + clip_high) * A)
        loss  = -aggregate(obj)                                 # loss_agg

    clip_against="proximal" (decoupled PPO: Hilton et al. 2022, AReaL, Fu et al. 2025):
    the behaviour policy only weighs the token, the clip bounds the change from the
    proximal policy, the weights this step began with (pi_prox = sg[pi]: one optimizer
    step per batch), with sg the stop-gradient:
        w     = sg[min(r, is_cap)]                              # truncated IS weight
        q     = pi / sg[pi]                                     # 1 in value
        obj   = w * min(q * A, clip(q, 1 - clip_low, 1 + clip_high) * A)
    Its gradient is w * A * grad(log pi) on every token: no token loses its gradient
    because the engine's numerics or stale weights moved r out of the clip range, and a
    token past the cap still counts, at weight is_cap (TRL's loss with num_iterations=1
    and its vLLM importance-sampling correction; verl's with rollout IS).

    ratio_level="token": r = exp(logprobs - behaviour_logprobs), per token (PPO, GRPO).
    ratio_level="sequence": r = exp(mean over the sequence's tokens of that log-ratio),
    the same for every token of a sequence, with the gradient of each token's log-prob
    (GSPO, Zheng et al. 2025, its GSPO-token form: value sg[s_i] * pi/sg[pi]); with
    loss_agg=seq_mean_token_mean this is the paper's sequence objective. GSPO's clip
    ranges are small (3e-4, 4e-4): set clip_low/clip_high to match.

    Against the behaviour policy, the cap matters for A < 0: there PPO's min picks the
    unclipped r * A, which grows without bound as r grows (one stale or numerically off
    token could dominate a step); capped, it is at most is_cap * |A| and carries no
    gradient (dual-clip PPO). For A > 0 the upper clip already bounds it.

    Stats (Python floats, over masked tokens):
      clip_frac       tokens where the clipped term is strictly the smaller one, i.e.
                      the PPO clip bounds the objective and blocks the gradient:
                      r_cap > 1 + clip_high with A > 0, or r_cap < 1 - clip_low with A < 0
                      (against the proximal policy q = 1: always 0)
      is_ratio_max    the largest raw (uncapped) ratio r
      is_capped_frac  tokens with r > is_cap
      approx_kl       mean of (r - 1) - log r with the token ratio: the k3 estimator of
                      KL(behaviour || policy) on tokens sampled from the behaviour policy
    """
    valid = mask > 0
    m = mask.to(logprobs.dtype)
    if norm is None:
        norm = LossNorm(tokens=int(m.sum().item()), seqs=int((m.sum(-1) > 0).sum().item()), max_tokens=mask.shape[-1])
    # Zero the log-ratio outside the mask before exp: padding may hold anything (even
    # -inf), and exp of garbage times a zero mask would still be nan.
    log_ratio = torch.where(valid, logprobs - behaviour_logprobs, torch.zeros_like(logprobs))  # [N, L]
    if ratio_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # [N, 1]
        ratio_log = seq_log_ratio.detach() + logprobs - logprobs.detach()  # value: the sequence's
        ratio_log = torch.where(valid, ratio_log, torch.zeros_like(ratio_log))
    elif ratio_level == "token":
        ratio_log = log_ratio
    else:
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = torch.exp(ratio_log)  # [N, L]
    adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [N, 1]
    if clip_against == "behaviour":
        capped = torch.clamp(ratio, max=is_cap)  # [N, L]
        unclipped_obj = capped * adv  # [N, L]
        clipped_obj = torch.clamp(capped, 1.0 - clip_low, 1.0 + clip_high) * adv  # [N, L]
    elif clip_against == "proximal":
        weight = torch.clamp(ratio.detach(), max=is_cap)  # [N, L]
        proximal = torch.exp(ratio_log - ratio_log.detach())  # [N, L] 1 in value
        unclipped_obj = weight * proximal * adv  # [N, L]
        clipped_obj = weight * torch.clamp(proximal, 1.0 - clip_low, 1.0 + clip_high) * adv  # [N, L]
    else:
        raise ValueError(f"clip_against must be 'behaviour' or 'proximal', got {clip_against!r}")
    obj = torch.minimum(unclipped_obj, clipped_obj)  # [N, L]
    loss = -aggregate(obj, mask, loss_agg, norm)

    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        r = ratio.detach()
        token_r = torch.exp(log_ratio.detach())
        stats = torch.stack(
            [
                ((clipped_obj < unclipped_obj) & valid).sum() / n,
                torch.where(valid, r, torch.zeros_like(r)).max(),
                ((r > is_cap) & valid).sum() / n,
                (((token_r - 1.0) - log_ratio.detach()) * m).sum() / n,
            ]
        ).tolist()  # one device sync for all four
    names = ("clip_frac", "is_ratio_max", "is_capped_frac", "approx_kl")
    return loss, dict(zip(names, stats))
