"""Metric names (their one home) and the per-step metrics record.

Names are grouped by prefix, CleanRL style: `reward/`, `loss/`, `completion/`,
`capacity/`, `staleness/`, `perf/`, `optim/`, `eval/`. The step log event, the eval event,
`metrics.jsonl`, the trackers and the plots all use these constants.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from typing import Any, Sequence

STEP = "step"
POLICY_VERSION = "policy_version"
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
REWARD_FRAC_ZERO_STD_GROUPS = "reward/frac_zero_std_groups"
LOSS_POLICY = "loss/policy"
LOSS_CLIP_FRAC = "loss/clip_frac"
LOSS_IS_RATIO_MAX = "loss/is_ratio_max"
LOSS_IS_CAPPED_FRAC = "loss/is_capped_frac"
LOSS_APPROX_KL = "loss/approx_kl"
LOSS_GRAD_NORM = "loss/grad_norm"
OPTIM_LR = "optim/lr"  # the step's learning rate (algo.lr_schedule, algo.lr_warmup_steps)
COMPLETION_MEAN_LEN = "completion/mean_len"
COMPLETION_CLIPPED_FRAC = "completion/clipped_frac"
CAPACITY_FREE = "capacity/free"
CAPACITY_IN_FLIGHT = "capacity/in_flight"
CAPACITY_QUEUED = "capacity/queued"
STALENESS_MEAN = "staleness/mean"
STALENESS_MAX = "staleness/max"
PERF_GEN_TOKENS_PER_S = "perf/gen_tokens_per_s"
PERF_STEP_S = "perf/step_s"
PERF_TRAINER_IDLE_FRAC = "perf/trainer_idle_frac"
PERF_WEIGHT_SYNC_S = "perf/weight_sync_s"
PERF_TRAIN_S = "perf/train_s"
# The training work of a step, which perf/train_s alone hides: rows of groups without
# reward spread are skipped, so a policy that learns faster trains fewer rows per step.
PERF_TRAIN_ROWS = "perf/train_rows"  # completions forwarded and backpropagated (all ranks)
PERF_TRAIN_TOKENS = "perf/train_tokens"  # their prompt + completion tokens (padding not counted)
PERF_TRAIN_TOKENS_PER_S = "perf/train_tokens_per_s"  # perf/train_tokens / perf/train_s
PERF_RANKS = "perf/ranks"  # training processes (trainer.ranks)
PERF_ELAPSED_S = "perf/elapsed_s"  # wall time since this fit() began (setup, engine start included)
LOSS_ENTROPY = "loss/entropy"  # mean entropy of the policy over the trained tokens (null: none)
LOSS_KL_REF = "loss/kl_ref"  # mean KL(policy || reference) estimate, when algo.kl_coef > 0
LOSS_NONFINITE_SKIPPED = "loss/nonfinite_skipped"  # 1: the step's update was skipped (NaN/inf)
# The rollout/training mismatch over the step's trained tokens, whatever their staleness
# (TRL's sampling/..., SkyRL's): d = trainer log-prob - engine (behaviour) log-prob of the
# sampled token; the token importance ratio is exp(d), before any cap or clip.
MISMATCH_LOGPROB_DIFF_MEAN = "mismatch/logprob_diff_mean"  # mean |d|
MISMATCH_LOGPROB_DIFF_MAX = "mismatch/logprob_diff_max"  # max |d|
MISMATCH_IS_RATIO_MEAN = "mismatch/is_ratio_mean"  # mean exp(d)
MISMATCH_IS_RATIO_MIN = "mismatch/is_ratio_min"  # min exp(d)
MISMATCH_IS_RATIO_MAX = "mismatch/is_ratio_max"  # max exp(d) (loss/is_ratio_max: per sequence with GSPO)
# Run totals (since this process started the run).
DATA_PROMPTS_SKIPPED = "data/prompts_skipped"  # prompts that cannot fit the engine
REWARD_FILTERED_GROUPS = "reward/filtered_groups"  # groups with no reward spread released (filter_zero_std)
REWARD_GROUPS_SKIPPED = "reward/groups_skipped"  # groups given up (reward.on_error=skip)
REWARD_TIMEOUTS = "reward/timeouts"  # reward calls past reward.timeout_s
REWARD_ABANDONED_THREADS = "reward/abandoned_threads"  # stuck reward threads left behind

# An evaluation (trainer/eval.py): its own record in metrics.jsonl and its own `eval`
# event, at `step` = the optimizer steps done when it ran (0: before training).
EVAL_REWARD_MEAN = "eval/reward_mean"  # mean reward over every eval completion
EVAL_PASS_AT_1 = "eval/pass@1"  # unbiased pass@1 (Chen et al. 2021) from eval.samples samples
EVAL_PASS_AT_K = "eval/pass@k"  # unbiased pass@k, k = eval.samples: P(some sample passes)
EVAL_MEAN_AT_K = "eval/mean@k"  # mean over prompts of the k samples' mean pass rate... see trainer/eval.py
EVAL_COMPLETION_LEN = "eval/completion_len"  # mean tokens per eval completion
EVAL_K = "eval/k"  # the k of pass@k and mean@k (eval.samples)
EVAL_PROMPTS = "eval/prompts"  # prompts evaluated
PERF_EVAL_S = "perf/eval_s"  # wall time of the evaluation (the trainer waits for it)
EVAL_RECORD_KEYS = (
    STEP, POLICY_VERSION, EVAL_REWARD_MEAN, EVAL_PASS_AT_1, EVAL_PASS_AT_K, EVAL_MEAN_AT_K,
    EVAL_COMPLETION_LEN, EVAL_K, EVAL_PROMPTS, PERF_EVAL_S, PERF_ELAPSED_S,
)
# What run.keep_best may name: higher is better.
KEEP_BEST_METRICS = (EVAL_PASS_AT_1, EVAL_PASS_AT_K, EVAL_MEAN_AT_K, EVAL_REWARD_MEAN)


def is_eval_record(record: dict[str, Any]) -> bool:
    return EVAL_PASS_AT_1 in record


# null when the step trained no token (every group without reward spread, say).
NULLABLE_KEYS = (
    LOSS_ENTROPY, MISMATCH_LOGPROB_DIFF_MEAN, MISMATCH_LOGPROB_DIFF_MAX, MISMATCH_IS_RATIO_MEAN,
    MISMATCH_IS_RATIO_MIN, MISMATCH_IS_RATIO_MAX,
)


def reward_function_mean(name: str) -> str:
    """The mean of one reward function's values over a step's completions."""
    return f"reward/{name}/mean"


# Largest |trainer log-prob - engine log-prob| over tokens of groups sampled entirely
# under the current policy version: ~0 proves the engines hold the trainer's weights.
SYNC_LOGPROB_MAX_DIFF = "sync/logprob_max_diff"

# Every step record (the `train_step` event, a metrics.jsonl line) carries these, as
# numbers, except those in NULLABLE_KEYS, and a value that was not finite (a skipped
# step's loss), which are null. SYNC_LOGPROB_MAX_DIFF is not among them: a step may
# train on no group sampled entirely under the current weights.
STEP_RECORD_KEYS = (
    STEP,
    POLICY_VERSION,
    REWARD_MEAN,
    REWARD_STD,
    REWARD_FRAC_ZERO_STD_GROUPS,
    LOSS_POLICY,
    LOSS_CLIP_FRAC,
    LOSS_IS_RATIO_MAX,
    LOSS_IS_CAPPED_FRAC,
    LOSS_APPROX_KL,
    LOSS_GRAD_NORM,
    LOSS_ENTROPY,
    LOSS_NONFINITE_SKIPPED,
    OPTIM_LR,
    MISMATCH_LOGPROB_DIFF_MEAN,
    MISMATCH_LOGPROB_DIFF_MAX,
    MISMATCH_IS_RATIO_MEAN,
    MISMATCH_IS_RATIO_MIN,
    MISMATCH_IS_RATIO_MAX,
    COMPLETION_MEAN_LEN,
    COMPLETION_CLIPPED_FRAC,
    CAPACITY_FREE,
    CAPACITY_IN_FLIGHT,
    CAPACITY_QUEUED,
    STALENESS_MEAN,
    STALENESS_MAX,
    PERF_GEN_TOKENS_PER_S,
    PERF_STEP_S,
    PERF_TRAIN_S,
    PERF_TRAIN_ROWS,
    PERF_TRAIN_TOKENS,
    PERF_TRAIN_TOKENS_PER_S,
    PERF_TRAINER_IDLE_FRAC,
    PERF_WEIGHT_SYNC_S,
    PERF_RANKS,
    PERF_ELAPSED_S,
    DATA_PROMPTS_SKIPPED,
    REWARD_FILTERED_GROUPS,
    REWARD_GROUPS_SKIPPED,
    REWARD_TIMEOUTS,
    REWARD_ABANDONED_THREADS,
)


def batch_metrics(groups: Sequence[Any], version: int) -> dict[str, float]:
    """Reward, completion and staleness metrics of one batch of RolloutGroups,
    consumed at policy `version`."""
    rewards = [r for g in groups for r in g.rewards]
    lengths = [len(c) for g in groups for c in g.completion_token_ids]
    finish = [f for g in groups for f in g.finish_reasons]
    staleness = [version - g.start_version for g in groups]
    # One mean per reward function, when there are several (or one not the task's own).
    names = list(groups[0].reward_terms)
    terms = (
        {reward_function_mean(n): statistics.fmean(v for g in groups for v in g.reward_terms[n]) for n in names}
        if names != ["task"] else {}
    )
    return {
        **terms,
        REWARD_MEAN: statistics.fmean(rewards),
        REWARD_STD: statistics.pstdev(rewards),
        REWARD_FRAC_ZERO_STD_GROUPS: sum(len(set(g.rewards)) == 1 for g in groups) / len(groups),
        COMPLETION_MEAN_LEN: statistics.fmean(lengths),
        COMPLETION_CLIPPED_FRAC: sum(f == "length" for f in finish) / len(finish),
        STALENESS_MEAN: statistics.fmean(staleness),
        STALENESS_MAX: max(staleness),
    }


class MetricsFile:
    """Appends one JSON object per step to RUN_DIR/metrics.jsonl."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as None: JSON has no NaN, and ops tooling chokes on it."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
