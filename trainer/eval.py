"""Evaluation on a held-out task: k samples per prompt, scored by the task's reward.

    evaluator = Evaluator(cfg, tokenizer)                # builds eval.task, renders its prompts
    metrics = evaluator.run(supervisor, timeout_s=600)   # {"eval/pass@1": 0.42, ...}

The trainer evaluates every eval.every steps (and after the last), on its own engines
through the same worker threads (workers/worker.py `EvalJob`): the eval requests share
the engines' batches with the training groups but hold no permit, so the staleness
bound and the capacity counters are untouched, and an engine that dies during an
evaluation fails the run as fast as during training. The weights do not change during
an evaluation: only the main thread syncs them, and it waits for the result.
`scripts/evaluate.py` runs the same evaluation on a saved model.

The score of a completion is the eval task's own reward (reward.functions shape the
training reward and are not used here); it passes when the score is at least
eval.pass_threshold. With n = eval.samples completions of a prompt, c of which pass:
* pass@k: the unbiased estimator of Chen et al. 2021, 1 - C(n-c, k) / C(n, k), averaged
  over prompts; eval/pass@1 is k = 1 (c / n), eval/pass@k is k = n (some sample passes);
* mean@k: the mean over prompts of the mean score of their n samples (verl's mean@N);
* reward_mean: the mean score over every completion. With the same n for every prompt it
  equals mean@k, and for a 0/1 reward (the built-in tasks') both equal pass@1.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Sequence

import structlog

from trainer import metrics as M
from trainer.config import TrainerConfig
from trainer.rewards import reward_spec
from trainer.tasks import build_task, render_prompt
from workers.rewards import RewardPool
from workers.worker import EvalResult, PromptItem, SamplingSpec

log = structlog.get_logger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n,
    c of which pass, passes: 1 - C(n-c, k) / C(n, k), as a stable product (Chen et al.)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_metrics(results: Sequence[EvalResult], k: int, pass_threshold: float) -> dict[str, float]:
    """The eval/ metrics of scored prompts (each with k completions)."""
    if not results:
        raise ValueError("no prompt was evaluated")
    passes = [sum(r >= pass_threshold for r in res.rewards) for res in results]
    return {
        M.EVAL_REWARD_MEAN: statistics.fmean(r for res in results for r in res.rewards),
        M.EVAL_PASS_AT_1: statistics.fmean(pass_at_k(len(res.rewards), c, 1) for res, c in zip(results, passes)),
        M.EVAL_PASS_AT_K: statistics.fmean(pass_at_k(len(res.rewards), c, k) for res, c in zip(results, passes)),
        M.EVAL_MEAN_AT_K: statistics.fmean(statistics.fmean(res.rewards) for res in results),
        M.EVAL_COMPLETION_LEN: statistics.fmean(n for res in results for n in res.lengths),
        M.EVAL_K: k,
        M.EVAL_PROMPTS: len(results),
    }


class Evaluator:
    """The eval task, its rendered prompts, its sampling and its reward pool.

    eval.task null: the training task's config with eval.seed (a `task` object given to
    the Trainer is used as it is). A file task evaluated on itself is its training data:
    logged as `eval_on_training_prompts`."""

    def __init__(self, cfg: TrainerConfig, tokenizer: Any, task: Any = None):
        ev = cfg.eval
        task_cfg = ev.task or cfg.task
        if ev.task is None and task is not None:
            self.task = task
        else:
            self.task = build_task(task_cfg, ev.seed)
        if ev.task is None and (task is not None or task_cfg.name != "arithmetic"):
            log.warning(
                "eval_on_training_prompts", task=task_cfg.name,
                reason="eval.task is null: the evaluation draws from the training task; set eval.task to a held-out one",
            )
        max_tokens = ev.max_tokens or cfg.gen.max_tokens
        max_prompt_tokens = cfg.engine.max_model_len - max_tokens
        count = min(ev.prompts, len(self.task)) if hasattr(self.task, "__len__") else ev.prompts
        self.prompts: list[PromptItem] = []
        too_long = []
        for index in range(count):
            prompt = self.task.prompt(index)
            token_ids = render_prompt(tokenizer, prompt)
            if len(token_ids) > max_prompt_tokens:
                too_long.append(index)
                continue
            self.prompts.append(PromptItem(index=index, token_ids=token_ids, data=prompt))
        if too_long:
            log.warning("eval_prompts_skipped", reason="overlong", prompts=too_long[:10], count=len(too_long))
        if not self.prompts:
            from trainer.errors import ConfigError

            raise ConfigError(
                f"eval: none of the eval task's first {count} prompts fits in engine.max_model_len - "
                f"eval max_tokens ({max_prompt_tokens} tokens)", key="eval.prompts",
            )
        self.k = ev.samples
        self.pass_threshold = ev.pass_threshold
        self.sampling = SamplingSpec(
            group_size=ev.samples, max_tokens=max_tokens, temperature=ev.temperature,
            top_p=cfg.gen.top_p, seed=ev.seed,
        )
        # The task's reward alone, in threads, with the run's bounds and error policy.
        scoring = dataclasses.replace(cfg.reward, functions=[], executor="thread")
        self.rewards = RewardPool(reward_spec(scoring, self.task)).start()

    def run(self, supervisor: Any, timeout_s: float, health_check: Any = None) -> dict[str, float]:
        """Evaluate on the supervisor's engines; the eval/ metrics and perf/eval_s."""
        t0 = time.monotonic()
        results, skipped = supervisor.evaluate(self.prompts, self.sampling, self.rewards, timeout_s, health_check)
        if skipped:
            log.warning("eval_prompts_skipped", reason="reward failed", prompts=sorted(skipped)[:10], count=len(skipped))
        if not results:
            raise RuntimeError(f"evaluation: the reward failed for every one of the {len(skipped)} eval prompts")
        metrics = eval_metrics([results[p.index] for p in self.prompts if p.index in results], self.k, self.pass_threshold)
        metrics[M.PERF_EVAL_S] = time.monotonic() - t0
        return metrics

    def shutdown(self) -> None:
        self.rewards.shutdown()
