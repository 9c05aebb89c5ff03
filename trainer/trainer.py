"""The main thread: set up, train, clean up.

Per step, in order: take a batch of finished groups from the rollout queue (waiting in
short increments and re-raising any worker error) -> GRPO loss -> optimizer step ->
broadcast the new weights to every engine and wait for each to hold them -> retire the
batch's permits (which moves the policy version and lets generation run on) -> log.

Whatever happens, `cleanup()` stops the workers and shuts the engines down, and the
original exception propagates: a library user sees it in the cell, the CLI turns it
into one `run_failed` log line and exit code 1.
"""

from __future__ import annotations

import pathlib
import threading
import time
import uuid
from typing import Any

import structlog
import torch

from capacity import QueueClosed, RolloutQueue
from trainer import metrics as M
from trainer.config import TrainerConfig
from trainer.loss import group_advantages, policy_loss
from trainer.models import load_policy, resolve_model_path
from trainer.policy import TokenBatch, resolve_device, resolve_dtype, token_logprobs, weights_to_bytes
from trainer.tasks import build_task, render_prompt
from workers.engine import Engine
from workers.supervisor import Supervisor
from workers.worker import GenerationWorker, PromptItem, RewardSpec, RolloutGroup, SamplingSpec

log = structlog.get_logger(__name__)


class PromptCursor:
    """Hands out prompts in index order to every worker thread: the shared prompt source.
    The cursor is what a resumed run continues from."""

    def __init__(self, task: Any, tokenizer: Any, start: int = 0):
        self._task = task
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.cursor = start

    def next(self) -> PromptItem:
        with self._lock:
            index = self.cursor
            self.cursor += 1
            prompt = self._task.prompt(index)
            token_ids = render_prompt(self._tokenizer, prompt)
        return PromptItem(index=index, token_ids=token_ids, data=prompt)


class Trainer:
    """GRPO post-training with vLLM engines in worker threads.

    `Trainer(cfg).fit()` returns the per-step metrics. `task` overrides the configured
    task with any object that has `prompt(index)` and `reward(text, prompt)`."""

    def __init__(self, cfg: TrainerConfig, task: Any = None):
        cfg.validate()  # bad config fails here, before any engine starts
        self.cfg = cfg
        self.task = task
        self.run_id = uuid.uuid4().hex[:12]
        self.output_dir = pathlib.Path(cfg.run.output_dir)
        self.supervisor: Supervisor | None = None
        self.queue: RolloutQueue | None = None
        self.history: list[dict[str, Any]] = []

    # ---- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.dtype = resolve_dtype(cfg.trainer.dtype, self.device)
        self.model_path = resolve_model_path(cfg.model.path)
        if self.task is None:
            self.task = build_task(cfg.task, cfg.run.seed)
        log.info("setup", model=str(self.model_path), device=str(self.device), dtype=str(self.dtype))

        self.policy, self.tokenizer = load_policy(self.model_path, self.device, self.dtype)
        self.policy.train()
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.algo.lr, weight_decay=cfg.algo.weight_decay
        )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

        self.queue = RolloutQueue(cfg.algo.max_staleness, cfg.algo.groups_per_step)
        self.prompts = PromptCursor(self.task, self.tokenizer)
        engine_devices = self._engine_devices()
        sampling = SamplingSpec(
            group_size=cfg.algo.group_size,
            max_tokens=cfg.gen.max_tokens,
            temperature=cfg.gen.temperature,
            top_p=cfg.gen.top_p,
            seed=cfg.run.seed,
        )
        reward = RewardSpec(fn=self.task.reward, max_attempts=cfg.reward.max_attempts, on_error=cfg.reward.on_error)

        def build_engine(i: int) -> Engine:
            return Engine(
                str(self.model_path),
                index=i,
                kvcache_gib=cfg.engine.kvcache_gib,
                max_model_len=cfg.engine.max_model_len,
                max_num_seqs=cfg.engine.max_num_seqs,
                seed=cfg.run.seed + i,
                dtype=cfg.engine.dtype,
                device_id=engine_devices[i] if engine_devices else None,
            )

        count = len(engine_devices) if engine_devices else cfg.engine.count
        # What fits in an engine's batch, and no more than its share of the permits, so
        # the first engine to start cannot take every slot.
        groups_per_engine = max(
            1, min(cfg.engine.max_num_seqs // cfg.algo.group_size, -(-self.queue.permits // count))
        )

        def make_worker(i: int, on_error, start_gate) -> GenerationWorker:
            return GenerationWorker(
                i,
                build_engine=lambda: build_engine(i),
                queue=self.queue,
                prompts=self.prompts,
                sampling=sampling,
                reward=reward,
                max_groups_in_flight=groups_per_engine,
                on_error=on_error,
                start_gate=start_gate,
            )

        self.supervisor = Supervisor(self.queue, make_worker, count, hang_timeout_s=cfg.engine.hang_timeout_s)
        t0 = time.monotonic()
        self.supervisor.start()
        self.supervisor.wait_ready(cfg.engine.start_timeout_s)
        self.engine_dtype = self.supervisor.workers[0].engine.dtype
        log.info("engines_ready", count=count, seconds=round(time.monotonic() - t0, 1), engine_dtype=str(self.engine_dtype))

    def _engine_devices(self) -> list[int] | None:
        """GPU ids for the engines: engine.devices, or every GPU but the trainer's."""
        if self.device.type != "cuda":
            return None
        if self.cfg.engine.devices:
            return list(self.cfg.engine.devices)
        others = [i for i in range(torch.cuda.device_count()) if i != (self.device.index or 0)]
        return others or [self.device.index or 0]  # one GPU: share it

    # ---- train ------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        B = cfg.algo.groups_per_step
        metrics_file = M.MetricsFile(self.output_dir / "metrics.jsonl")
        tokens_before = self._generated_tokens()
        for step in range(cfg.run.steps):
            structlog.contextvars.bind_contextvars(step=step)
            t0 = time.monotonic()
            groups = self._get_batch(B)
            t_batch = time.monotonic()
            version = self.queue.version
            log.debug("phase", phase="train")
            loss_stats = self._train_on(groups)
            t_trained = time.monotonic()
            log.debug("phase", phase="sync")
            sync_s = self.supervisor.broadcast_weights(
                weights_to_bytes(self.policy, self.engine_dtype), version + 1, cfg.engine.sync_timeout_s
            )
            self.queue.retire(B)
            t1 = time.monotonic()

            tokens_now = self._generated_tokens()
            c = self.queue.counters()
            record = {
                M.STEP: step,
                M.POLICY_VERSION: self.queue.version,
                **M.batch_metrics(groups, version),
                **loss_stats,
                M.CAPACITY_FREE: c.free,
                M.CAPACITY_IN_FLIGHT: c.in_flight,
                M.CAPACITY_QUEUED: c.queued,
                M.PERF_GEN_TOKENS_PER_S: (tokens_now - tokens_before) / (t1 - t0),
                M.PERF_STEP_S: t1 - t0,
                M.PERF_TRAIN_S: t_trained - t_batch,
                M.PERF_TRAINER_IDLE_FRAC: (t_batch - t0) / (t1 - t0),
                M.PERF_WEIGHT_SYNC_S: sync_s,
            }
            tokens_before = tokens_now
            self.history.append(record)
            metrics_file.write(record)
            log.info("train_step", **{k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        structlog.contextvars.unbind_contextvars("step")
        self._save_final_model()
        return self.history

    def _get_batch(self, n: int) -> list[RolloutGroup]:
        try:
            return self.queue.get_batch(n, timeout=self.cfg.run.batch_timeout_s, health_check=self.supervisor.check)
        except QueueClosed:
            self.supervisor.check()  # the worker error that closed the queue, if any
            raise

    def _train_on(self, groups: list[RolloutGroup]) -> dict[str, float]:
        cfg = self.cfg
        G = cfg.algo.group_size
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [B, G]
        advantages = group_advantages(rewards, scale=cfg.algo.scale_rewards).reshape(-1)  # [B*G]
        batch = TokenBatch.build(
            prompts=[g.prompt_token_ids for g in groups for _ in range(G)],
            completions=[c for g in groups for c in g.completion_token_ids],
            behaviour=[lp for g in groups for lp in g.behaviour_logprobs],
            pad_id=self.pad_id,
            device=self.device,
        )
        advantages = advantages.to(self.device)
        version = self.queue.version
        on_policy = torch.tensor(  # [B*G] rows sampled entirely by the current weights
            [g.weight_versions == (version, version) for g in groups for _ in range(G)], device=self.device
        )
        # Rows with zero advantage add exactly zero to the loss: skip their compute. The
        # loss stays a token mean over the whole batch (its denominator counts them).
        rows = [i for i in range(len(advantages)) if advantages[i] != 0]
        stats = {M.LOSS_POLICY: 0.0, M.LOSS_CLIP_FRAC: 0.0, M.LOSS_IS_RATIO_MAX: 0.0, M.LOSS_APPROX_KL: 0.0, M.LOSS_GRAD_NORM: 0.0}
        if not rows:
            return stats  # no learning signal in this batch: the weights stay as they are
        self.optimizer.zero_grad(set_to_none=True)
        trained_tokens = 0
        mb = cfg.algo.micro_batch_size
        for start in range(0, len(rows), mb):
            idx = torch.tensor(rows[start : start + mb], device=self.device)
            sub = batch.select(idx)
            if sub.num_tokens == 0:
                continue
            self.supervisor.check()  # a long step on a big model should not delay a worker error
            logprobs = token_logprobs(self.policy, sub, cfg.gen.temperature)
            loss, s = policy_loss(
                logprobs, sub.behaviour_logprobs, advantages[idx], sub.completion_mask,
                clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, is_cap=cfg.algo.is_cap,
            )
            (loss * (sub.num_tokens / batch.num_tokens)).backward()
            sync_rows = on_policy[idx]
            if sync_rows.any():
                diff = ((logprobs.detach() - sub.behaviour_logprobs).abs() * sub.completion_mask)[sync_rows]
                stats[M.SYNC_LOGPROB_MAX_DIFF] = max(stats.get(M.SYNC_LOGPROB_MAX_DIFF, 0.0), diff.max().item())
            w = sub.num_tokens
            stats[M.LOSS_POLICY] += loss.item() * w / batch.num_tokens
            stats[M.LOSS_CLIP_FRAC] += s["clip_frac"] * w
            stats[M.LOSS_APPROX_KL] += s["approx_kl"] * w
            stats[M.LOSS_IS_RATIO_MAX] = max(stats[M.LOSS_IS_RATIO_MAX], s["is_ratio_max"])
            trained_tokens += w
        stats[M.LOSS_CLIP_FRAC] /= max(trained_tokens, 1)
        stats[M.LOSS_APPROX_KL] /= max(trained_tokens, 1)
        stats[M.LOSS_GRAD_NORM] = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.algo.max_grad_norm))
        self.optimizer.step()
        return stats

    @property
    def failed_worker(self) -> GenerationWorker | None:
        """The worker whose error ended the run, if one did."""
        return self.supervisor.failed_worker if self.supervisor is not None else None

    def _generated_tokens(self) -> int:
        return sum(w.stats["tokens"] for w in self.supervisor.workers)

    def _save_final_model(self) -> None:
        out = self.output_dir / "model"
        self.policy.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        log.info("model_saved", path=str(out))

    # ---- cleanup ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop the workers and engines; groups generated but never trained on are
        discarded, which returns their permits."""
        if self.supervisor is not None:
            self.supervisor.shutdown(timeout=self.cfg.engine.shutdown_timeout_s)
        if self.queue is not None:
            discarded = self.queue.discard_queued()
            log.info("capacity_final", discarded_groups=discarded, **self.queue.counters().as_dict())

    def fit(self) -> list[dict[str, Any]]:
        """Set up, train for run.steps, clean up. Re-raises any worker error."""
        self.history = []
        with structlog.contextvars.bound_contextvars(run_id=self.run_id):
            try:
                self.setup()
                self.train()
            finally:
                self.cleanup()
        # Every permit is back: nothing leaked across the run.
        self.final_counters = self.queue.assert_drained()
        return self.history
