"""The main thread: set up, train, clean up.

Per step, in order: take a batch of finished groups from the rollout queue (waiting in
short increments and re-raising any worker error) -> GRPO loss -> optimizer step ->
broadcast the new weights to every engine and wait for each to hold them -> retire the
batch's permits (which moves the policy version and lets generation run on) -> log.

Whatever happens, `cleanup()` stops the workers and shuts the engines down, and the
original exception propagates: a library user sees it in the cell, the CLI turns it
into one `run_failed` log line and exit code 1.

With trainer.ranks=N (trainer/ranks.py) this process is one of N: rank 0 runs the loop
above and gives each rank its share of the batch; ranks 1..N-1 run `_follow()`, doing
what rank 0 says. Each holds an FSDP2 shard of the policy and optimizer state.

Evaluation (trainer/eval.py) every eval.every steps and after the last (and before the
first with eval.before_train), on the same engines; the trainer waits for it, so it
scores exactly the policy of that step. With run.keep_best its best checkpoint is kept.

Checkpoints (trainer/checkpoint.py) every run.checkpoint_every steps and at the end;
`fit()` resumes from the latest valid one (run.resume). Stopping: SIGINT/SIGTERM (while
`fit()` runs in the main thread) or `request_stop()`: the first finishes the current
step, or abandons it while it is still waiting for rollouts, writes a checkpoint, shuts
the engines down and raises `RunInterrupted`; a second stops at the next check (a
rollout wait or a micro-batch), without a checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import threading
import time
import uuid
from typing import Any

import structlog
import torch

from capacity import QueueClosed, RolloutQueue
from trainer import checkpoint as ckpt
from trainer import metrics as M
from trainer import plots
from trainer.config import TrainerConfig
from trainer.errors import ConfigError, NonFiniteSteps, RunInterrupted
from trainer.eval import Evaluator
from trainer.loss import LossNorm, aggregate, group_advantages, kl_penalty, policy_loss
from trainer.models import check_in_blocks, load_model, load_tokenizer, resolve_model_path
from trainer.policy import (
    EngineWeights, TokenBatch, can_share, can_share_prompts, micro_batch_order, resolve_device, resolve_dtype, token_logprobs,
    warm_up_optimizer, weights_to_bytes,
)
from trainer.progress import StepBar
from trainer.prompts import PromptCursor, TrainedPrompts, scan_overlong
from trainer.ranks import Ranks, grad_norm_value, split_by_tokens, world_from_env
from trainer.rewards import reward_spec
from trainer.run_lock import OutputDirLock
from trainer.tasks import build_task
from trainer.tracking import Trackers, check_trackers
from workers.hardware import keep_freed_memory
from workers.rewards import RewardPool
from workers.supervisor import Supervisor
from workers.worker import GenerationWorker, RolloutGroup, SamplingSpec, ZeroStdFilter

log = structlog.get_logger(__name__)

PLOT_TIMEOUT_S = 60.0  # the longest the end of a run waits for RUN_DIR/metrics.png


class _StopRequested(Exception):
    """Raised at a check while waiting (for engines, for rollouts) once a stop was asked:
    the step is abandoned before anything of it was trained."""


class Trainer:
    """GRPO post-training with vLLM engines in worker threads.

    `Trainer(cfg).fit()` returns the per-step metrics. `task` overrides the configured
    task with any object that has `prompt(index)` and `reward(text, prompt)`."""

    def __init__(self, cfg: TrainerConfig, task: Any = None):
        cfg.validate()  # bad config fails here, before any engine starts
        self.cfg = cfg
        self.task = task
        self.rank, self.world, self.local_rank = world_from_env()
        # Every rank's logs carry the run id the launcher gave the ranks.
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")[:12] if self.world > 1 else ""
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.ranks = Ranks()  # joined in setup()
        self.stop_code = 0  # a follower rank: the exit code rank 0 gave it
        self.output_dir = pathlib.Path(cfg.run.output_dir)
        self.device = resolve_device(cfg.trainer.device, self.local_rank)
        self.dtype, self.autocast = resolve_dtype(cfg.trainer.dtype, self.device, cfg.engine.dtype)
        self.tokenizer = None  # loaded in setup()
        self.supervisor: Supervisor | None = None
        self.rewards: RewardPool | None = None
        self.engine_weights: EngineWeights | None = None  # rank 0, once the engines are up
        self.queue: RolloutQueue | None = None
        self.history: list[dict[str, Any]] = []  # the step records of this fit()
        self.evals: list[dict[str, Any]] = []  # the eval records of this fit()
        self.evaluator: Evaluator | None = None  # rank 0, when eval.every or eval.before_train
        self.best: dict[str, Any] | None = None  # the best checkpoint's record (run.keep_best)
        self.trackers: Trackers | None = None  # rank 0: log.trackers (trainer/tracking.py)
        self._bar: StepBar | None = None  # a progress bar on a terminal (trainer/progress.py)
        self.step = 0  # optimizer steps done, counting those before a resume
        self.resumed_from: pathlib.Path | None = None  # the checkpoint this fit() resumed from
        self.last_checkpoint: pathlib.Path | None = None
        self._fit_t0 = time.monotonic()  # when fit() began: perf/elapsed_s
        self._stop_count = 0  # stop requests (signals) during this fit()
        self._stop_signal: int | None = None
        self._in_cleanup = False
        self._lock = OutputDirLock(self.output_dir)  # rank 0 holds it while fit() runs

    # ---- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.supervisor = None
        self.rewards = None
        self.evaluator = None
        self.trackers = None
        self._nonfinite_in_a_row = 0
        main = self.rank == 0
        if self.world != cfg.trainer.ranks:
            raise ConfigError(
                f"this process is one of {self.world} ranks (WORLD_SIZE) but trainer.ranks={cfg.trainer.ranks}",
                key="trainer.ranks",
            )
        # First: one run per output directory (trainer/run_lock.py); then a bad run.resume
        # or a missing tracker package fails before anything heavy starts.
        if main:
            self._lock.acquire()
        self.resumed_from = self._checkpoint_to_resume() if main else None
        if main:
            check_trackers(cfg.log)
        torch.manual_seed(cfg.run.seed)
        self.model_path = resolve_model_path(cfg.model.path)
        if not main:  # a follower: rank 0 says which checkpoint (if any) to load
            self._setup_policy()
            init = self.ranks.receive()
            if init["warm_up"]:
                warm_up_optimizer(self.optimizer)
            if init["checkpoint"] is not None:
                # rank 0 verified it (_checkpoint_to_resume) before it sent the path
                ckpt.load_checkpoint(init["checkpoint"], self.policy, self.optimizer, self.device, verified=True)
            return
        if self.task is None:
            self.task = build_task(cfg.task, cfg.run.seed)
        self.tokenizer = load_tokenizer(self.model_path)

        self.start_step, version, self.trained = 0, 0, TrainedPrompts()
        self._saved_step: int | None = None
        if self.resumed_from is not None:
            state = ckpt.read_trainer_state(self.resumed_from)
            self.start_step, version = int(state["step"]), int(state["policy_version"])
            self.trained = TrainedPrompts.from_state(state["prompts"])
            self._saved_step = self.start_step
        self.step = self.start_step
        self._trim_metrics(self.output_dir / "metrics.jsonl", self.start_step)
        engine_devices = self._engine_devices()
        self.max_staleness = self._max_staleness(engine_devices)
        self.queue = RolloutQueue(self.max_staleness, cfg.algo.groups_per_step, version=version)
        # A prompt that cannot fit: a file task's rows are checked now (task.overlong=error
        # stops here, naming file:line), any other prompt when it is drawn.
        max_prompt_tokens = cfg.engine.max_model_len - cfg.gen.max_tokens
        scan_overlong(self.task, self.tokenizer, max_prompt_tokens, cfg.task.overlong)
        self.prompts = PromptCursor(
            self.task, self.tokenizer, start=self.trained.low_water, skip=self.trained.above,
            max_prompt_tokens=max_prompt_tokens, overlong=cfg.task.overlong,
        )
        self.best = ckpt.read_best(self.output_dir) if cfg.run.keep_best else None
        if self.best is not None and self.best["metric"] != cfg.run.keep_best:
            self.best = None  # another metric now: the next evaluation sets the bar
        self._complete = self.start_step >= cfg.run.steps
        if self._complete:
            log.info("run_already_complete", steps=self.start_step, checkpoint=str(self.resumed_from))
            self._setup_policy()  # the other ranks join, then hear "stop"
            self.ranks.send("init", {"checkpoint": None, "warm_up": False})  # no step to warm up for
            return
        # Started in the background: a tracker's init (wandb's service) never delays the run.
        self.trackers = Trackers.start(
            cfg, run_dir=self.output_dir, run_id=self.run_id, start_step=self.start_step,
            resumed=self.resumed_from is not None,
        )
        sampling = SamplingSpec(
            group_size=cfg.algo.group_size,
            max_tokens=cfg.gen.max_tokens,
            temperature=cfg.gen.temperature,
            top_p=cfg.gen.top_p,
            seed=cfg.run.seed,
        )
        # Rewards run off the engines' threads, each call timed (workers/rewards.py).
        self.rewards = RewardPool(reward_spec(cfg.reward, self.task)).start()
        if cfg.eval.every or cfg.eval.before_train:  # its task and prompts fail here, not at step N
            self.evaluator = Evaluator(cfg, self.tokenizer, self.task if cfg.eval.task is None else None)

        count = len(engine_devices) if engine_devices else cfg.engine.count
        # Twice what fits in an engine's batch, so that vLLM refills the seat of a finished
        # sample from its waiting queue at once instead of idling until the whole group is
        # done (SmolLM2: 0.93 -> 1.04 of plain vLLM's tokens/s, scripts/bench_generation.py);
        # and no more than the engine's share of the permits, so the first engine up
        # cannot take every slot.
        groups_per_engine = max(
            1, min(2 * cfg.engine.max_num_seqs // cfg.algo.group_size, -(-self.queue.permits // count))
        )

        zero_std_filter = (
            ZeroStdFilter(round(cfg.algo.filter_budget * cfg.algo.groups_per_step)) if cfg.algo.filter_zero_std else None
        )

        def make_worker(i: int, on_error, start_gate) -> GenerationWorker:
            return GenerationWorker(
                i,
                build_engine=lambda: build_engine(cfg, self.model_path, i, engine_devices[i] if engine_devices else None),
                queue=self.queue,
                prompts=self.prompts,
                sampling=sampling,
                rewards=self.rewards,
                max_groups_in_flight=groups_per_engine,
                first_batch_share=-(-cfg.algo.groups_per_step // count),
                on_error=on_error,
                start_gate=start_gate,
                filter_zero_std=zero_std_filter,
            )

        # The engines start first, in their threads (tens of seconds: processes, imports,
        # the model, the KV cache); the policy loads meanwhile.
        self.supervisor = Supervisor(self.queue, make_worker, count, hang_timeout_s=cfg.engine.hang_timeout_s)
        t0 = time.monotonic()
        self.supervisor.start()
        self._setup_policy()
        warm_up_optimizer(self.optimizer)  # its state allocated now, while the engines start
        self.ranks.send("init", {"checkpoint": str(self.resumed_from) if self.resumed_from else None, "warm_up": True})
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        self.supervisor.wait_ready(cfg.engine.start_timeout_s, health_check=self._check_waiting, open_gate=False)
        self.engine_dtype = self.supervisor.workers[0].engine.dtype
        self.engine_weights = EngineWeights(self.engine_dtype)
        if self.autocast is not None and self.engine_dtype != self.autocast:
            # Learning through numerics the engines do not sample with (resolve_dtype).
            log.warning(
                "trainer_engine_numerics_differ", trainer_dtype=cfg.trainer.dtype, autocast=str(self.autocast),
                engine_dtype=str(self.engine_dtype),
                hint="trainer.dtype=float32, or engine.dtype=bfloat16: beside a float32 engine a mixed trainer's "
                "policy drifted from the engine's until training collapsed (README, Time to quality)",
            )
        if self.resumed_from is not None:
            # The engines loaded the base model: they get the resumed policy before they
            # generate anything (the workers apply their inbox while the gate is shut).
            self._sync_weights(version)
        self.supervisor.open_gate()
        log.info(
            "engines_ready", count=count, seconds=round(time.monotonic() - t0, 1), engine_dtype=str(self.engine_dtype),
            max_staleness=self.max_staleness,
        )

    def _setup_policy(self) -> None:
        """Every rank: join the ranks, load the policy (and the reference), shard them,
        and make the optimizer (over this rank's shard)."""
        cfg = self.cfg
        # Training on a CPU frees and reallocates the same hundreds of MB every micro-batch:
        # keep them in the process (trainer.keep_freed_memory, workers/hardware.py).
        malloc_keeps_freed = cfg.trainer.keep_freed_memory and self.device.type == "cpu" and keep_freed_memory()
        self.ranks = Ranks.start(self.device, cfg.trainer.collective_timeout_s)
        self.policy = self.ranks.shard(load_model(self.model_path, self.device, self.dtype).train())
        check_in_blocks(self.policy, self._check)  # a worker error or a stop ends a micro-batch early
        self.share_prompts = cfg.trainer.share_prompts and can_share_prompts(self.policy)
        if self.tokenizer is None:  # rank 0 loaded it first, for the prompts
            self.tokenizer = load_tokenizer(self.model_path)
        log.info(
            "setup", model=str(self.model_path), device=str(self.device), dtype=str(self.dtype),
            autocast=str(self.autocast) if self.autocast else None, pid=os.getpid(),
            policy_shard_mib=round(sum(_local(p).nbytes for p in self.policy.parameters()) / 2**20, 1),
            malloc_keeps_freed=malloc_keeps_freed, share_prompts=self.share_prompts,
        )
        self.reference = None  # the frozen initial policy, for algo.kl_coef
        if cfg.algo.kl_coef > 0:
            self.reference = self.ranks.shard(load_model(self.model_path, self.device, self.dtype).eval().requires_grad_(False))
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.algo.lr, weight_decay=cfg.algo.weight_decay
        )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self._nonfinite_in_a_row = 0

    def _checkpoint_to_resume(self) -> pathlib.Path | None:
        """The checkpoint run.resume asks for: "never" -> None, "auto" -> the latest
        valid one in output_dir (each newer invalid one logged), else that directory."""
        resume = self.cfg.run.resume
        if resume == "never":
            existing = ckpt.list_checkpoints(self.output_dir)
            if existing:
                raise ConfigError(
                    f"run.resume=never, but {ckpt.checkpoint_root(self.output_dir)} holds checkpoints of an "
                    f"earlier run (newest: step {existing[-1][0]}) that new ones would mix with: use "
                    "run.resume=auto to continue that run, or another run.output_dir",
                    key="run.resume",
                )
            return None
        if resume == "auto":
            return ckpt.latest_valid_checkpoint(self.output_dir)
        try:
            ckpt.verify_checkpoint(resume)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"run.resume: {e}", key="run.resume") from e
        return pathlib.Path(resume)

    def _resume(self, path: pathlib.Path) -> None:
        """Load the checkpoint's weights, optimizer state and RNGs (its trainer state was
        read before the engines started)."""
        state = ckpt.load_checkpoint(path, self.policy, self.optimizer, self.device, verified=True)  # _checkpoint_to_resume did
        ckpt.set_rng_state(state["rng"])
        changed = _changed_keys(state["config"], self.cfg.to_dict())
        if changed:
            log.warning("resume_config_changed", keys=changed)
        log.info(
            "resumed", checkpoint=str(path), checkpoint_step=self.start_step, policy_version=self.queue.version,
            prompts_low_water=self.trained.low_water, prompts_above=len(self.trained.above),
        )

    @staticmethod
    def _trim_metrics(path: pathlib.Path, start_step: int) -> None:
        """Drop the records of steps >= start_step (a killed run's steps after its last
        checkpoint, which the resumed run trains again) and of evaluations after it;
        atomic rewrite."""
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = record[M.STEP] <= start_step if M.is_eval_record(record) else record[M.STEP] < start_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def _engine_devices(self) -> list[int] | None:
        """GPU ids for the engines: engine.devices, or every GPU but the trainer ranks'
        (GPUs 0..N-1 with N ranks; trainer/ranks.check_layout has vetted the layout)."""
        if self.device.type != "cuda":
            return None
        if self.cfg.engine.devices:
            return list(self.cfg.engine.devices)
        trainer_gpus = set(range(self.world)) if self.world > 1 else {self.device.index or 0}
        others = [i for i in range(torch.cuda.device_count()) if i not in trainer_gpus]
        return others or [self.device.index or 0]  # one GPU: share it

    def _max_staleness(self, engine_devices: list[int] | None) -> int:
        """algo.max_staleness, "auto" resolved: 0 where the engines share the trainer's
        compute (on CPU, or the trainer's one GPU), 1 where they have GPUs of their own."""
        setting = self.cfg.algo.max_staleness
        if setting != "auto":
            return setting
        shared = engine_devices is None or (self.device.index or 0) in engine_devices
        return 0 if shared else 1

    # ---- train ------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        B = cfg.algo.groups_per_step
        if self._complete:
            return self.history
        metrics_file = M.MetricsFile(self.output_dir / "metrics.jsonl")
        self._bar = StepBar(cfg.run.steps, self.start_step)
        # matplotlib loads while the first batch is generated, not after the last step.
        threading.Thread(target=plots.preload, name="plot-preload", daemon=True).start()
        if self.evaluator is not None and cfg.eval.before_train:
            self._evaluate(metrics_file)
        tokens_before = self._generated_tokens()
        for step in range(self.start_step, cfg.run.steps):
            structlog.contextvars.bind_contextvars(step=step)
            t0 = time.monotonic()
            groups = self.queue.get_batch(B, timeout=cfg.run.batch_timeout_s, health_check=self._check_waiting)
            t_batch = time.monotonic()
            # The last step, with no evaluation after it: what the engines would generate
            # from now on is never trained on, so they stop here. Their shutdown and the
            # cores they free go to this step, which makes no weight sync.
            final = step == cfg.run.steps - 1 and self.evaluator is None
            if final:
                self.supervisor.stop_workers(keep_queue_open=True)
            log.debug("batch", prompt_indices=sorted(g.prompt_index for g in groups))
            version = self.queue.version
            log.debug("phase", phase="train")
            loss_stats = self._train_on(groups)
            t_trained = time.monotonic()
            log.debug("phase", phase="sync")
            sync_s = 0.0 if final else self._sync_weights(version + 1)
            self.queue.retire(B)
            self.trained.add(g.prompt_index for g in groups)
            self.trained.add(self.prompts.take_skipped())  # overlong: done for good
            for w in self.supervisor.workers:
                self.trained.add(w.take_filtered())  # no reward spread: done for this run
            self.step = step + 1
            t1 = time.monotonic()

            tokens_now = self._generated_tokens()
            c = self.queue.counters()
            record = {
                M.STEP: step,
                M.POLICY_VERSION: self.queue.version,
                **M.batch_metrics(groups, version),
                **loss_stats,
                **self._counter_metrics(),
                M.CAPACITY_FREE: c.free,
                M.CAPACITY_IN_FLIGHT: c.in_flight,
                M.CAPACITY_QUEUED: c.queued,
                M.PERF_GEN_TOKENS_PER_S: (tokens_now - tokens_before) / (t1 - t0),
                M.PERF_STEP_S: t1 - t0,
                M.PERF_TRAIN_S: t_trained - t_batch,
                M.PERF_TRAIN_TOKENS_PER_S: loss_stats[M.PERF_TRAIN_TOKENS] / max(t_trained - t_batch, 1e-9),
                M.PERF_TRAINER_IDLE_FRAC: (t_batch - t0) / (t1 - t0),
                M.PERF_WEIGHT_SYNC_S: sync_s,
                M.PERF_RANKS: self.world,
                M.PERF_ELAPSED_S: t1 - self._fit_t0,
            }
            tokens_before = tokens_now
            record = M.json_safe(record)  # a skipped non-finite step logs null, not NaN
            self.history.append(record)
            metrics_file.write(record)
            self.trackers.log(record, step=step)
            log.info("train_step", **{k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
            self._bar.update(record)
            if self.evaluator is not None and (self.step % cfg.eval.every == 0 or self.step == cfg.run.steps):
                self._evaluate(metrics_file)
                tokens_before = self._generated_tokens()  # the next step's rate counts from here
            if self.step % cfg.run.checkpoint_every == 0 and self.step < cfg.run.steps:
                self._save_checkpoint()
            if self._stop_count and self.step < cfg.run.steps:
                log.warning("stopping", after_step=step, reason="stop requested; step finished")
                structlog.contextvars.unbind_contextvars("step")
                return self.history  # fit() writes the checkpoint
        structlog.contextvars.unbind_contextvars("step")
        # The engines are done (stopped at the last step, or now, after the evaluation):
        # they exit while the final checkpoint, the model and the plot are written (in a
        # thread of its own, ~1-2 s of matplotlib); cleanup() joins.
        self.supervisor.stop_workers()
        plot = threading.Thread(target=contextvars.copy_context().run, args=(self._plot_metrics,), name="plot", daemon=True)
        plot.start()
        self._save_final_model(self._save_checkpoint())
        plot.join(PLOT_TIMEOUT_S)
        if plot.is_alive():
            log.warning("plot_failed", error_type="Timeout", error=f"not done after {PLOT_TIMEOUT_S:.0f} s")
        return self.history

    def _evaluate(self, metrics_file: M.MetricsFile) -> dict[str, Any]:
        """Evaluate the current policy (trainer/eval.py) and record it: the `eval` event,
        an eval record in metrics.jsonl at `step` = steps done, and run.keep_best."""
        log.debug("phase", phase="eval")
        metrics = self.evaluator.run(self.supervisor, self.cfg.run.batch_timeout_s, self._check_waiting)
        record = M.json_safe({
            M.STEP: self.step, M.POLICY_VERSION: self.queue.version, **metrics,
            M.PERF_ELAPSED_S: time.monotonic() - self._fit_t0,
        })
        self.evals.append(record)
        metrics_file.write(record)
        self.trackers.log(record, step=self.step)
        log.info("eval", **{k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        metric = self.cfg.run.keep_best
        value = record.get(metric) if metric else None
        # Step 0 is the base model, which is not a checkpoint; it sets no bar either.
        if value is not None and self.step > 0 and (self.best is None or value > self.best["value"]):
            path = self._save_checkpoint()
            self.best = ckpt.mark_best(self.output_dir, self.step, metric, value, self.cfg.run.keep_checkpoints)
            log.info("best_checkpoint", path=str(path), checkpoint_step=self.step, metric=metric, value=round(value, 4))
        return record

    def _counter_metrics(self) -> dict[str, int]:
        """Run totals of what was skipped or went wrong off the main thread."""
        return {
            M.DATA_PROMPTS_SKIPPED: self.prompts.skipped_total,
            M.REWARD_GROUPS_SKIPPED: sum(w.stats["skipped"] for w in self.supervisor.workers),
            M.REWARD_FILTERED_GROUPS: sum(w.stats["filtered"] for w in self.supervisor.workers),
            M.REWARD_TIMEOUTS: self.rewards.stats["timeouts"],
            M.REWARD_ABANDONED_THREADS: self.rewards.stats["abandoned_threads"],
        }

    def _train_on(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """Advantages over the whole batch, then one optimizer step; with ranks, each rank
        trains on its share of the rows (balanced by tokens) and FSDP sums the gradients."""
        cfg = self.cfg
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [B, G]
        advantages = group_advantages(rewards, scale=cfg.algo.scale_rewards).reshape(-1).tolist()  # [B*G]
        version = self.queue.version
        rows = [
            {
                "prompt": g.prompt_token_ids,
                "completion": c,
                "behaviour": lp,
                # algo.mask_truncated: completions cut off by gen.max_tokens stay out of the loss.
                "in_loss": not (cfg.algo.mask_truncated and f == "length"),
                # sampled entirely by the current weights: checks the sync (sync/logprob_max_diff)
                "on_policy": g.weight_versions == (version, version),
            }
            for g in groups
            for c, lp, f in zip(g.completion_token_ids, g.behaviour_logprobs, g.finish_reasons)
        ]
        for row, a in zip(rows, advantages):
            row["advantage"] = a
        in_loss = [len(r["completion"]) if r["in_loss"] else 0 for r in rows]
        norm = LossNorm(tokens=sum(in_loss), seqs=sum(n > 0 for n in in_loss), max_tokens=cfg.gen.max_tokens)
        # Without an entropy or KL term, rows with zero advantage add exactly zero to the
        # loss: skip their compute. The aggregate's denominators still count them (`norm`).
        if cfg.algo.entropy_coef == 0 and cfg.algo.kl_coef == 0:
            rows = [r for r in rows if r["advantage"] != 0]
        lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]  # tokens each row forwards
        shares = [[rows[i] for i in part] for part in split_by_tokens(lengths, self.world)]
        micro_batches = max(-(-len(share) // cfg.algo.micro_batch_size) for share in shares)
        norm_fields = dataclasses.asdict(norm)
        self.ranks.send("step", [
            {"rows": share, "norm": norm_fields, "micro_batches": micro_batches, "step": self.step} for share in shares
        ])
        return {
            **self._optimizer_step(shares[0], norm, micro_batches),
            M.PERF_TRAIN_ROWS: len(rows),
            M.PERF_TRAIN_TOKENS: sum(lengths),
        }

    def _optimizer_step(self, rows: list[dict[str, Any]], norm: LossNorm, micro_batches: int) -> dict[str, float]:
        """The loss on this rank's rows in `micro_batches` micro-batches (every rank runs
        the same number: each is a collective; a rank short of rows runs empty ones),
        then clip and step. Every rank reaches the same decision to step or skip."""
        cfg = self.cfg
        entropy_coef, kl_coef = cfg.algo.entropy_coef, cfg.algo.kl_coef
        stats = {
            M.LOSS_POLICY: 0.0, M.LOSS_CLIP_FRAC: 0.0, M.LOSS_IS_RATIO_MAX: 0.0, M.LOSS_IS_CAPPED_FRAC: 0.0,
            M.LOSS_APPROX_KL: 0.0, M.LOSS_GRAD_NORM: 0.0, M.LOSS_NONFINITE_SKIPPED: 0,
            M.OPTIM_LR: cfg.algo.lr_at(self.step, cfg.run.steps),
            **{name: None for name in M.NULLABLE_KEYS},  # null when no token is trained
        }
        if kl_coef != 0:
            stats[M.LOSS_KL_REF] = None
        if micro_batches == 0:
            return stats  # no learning signal in this batch: the weights stay as they are
        # An empty micro-batch: one masked-out token, so that the forward and backward
        # (and their collectives) run with a zero loss.
        empty = {"prompt": [self.pad_id] * 2, "completion": [self.pad_id], "behaviour": [0.0], "in_loss": False,
                 "on_policy": False, "advantage": 0.0}
        share = self.share_prompts
        if share and self.world > 1:
            # The ranks' micro-batches run the same FSDP collectives only if they forward
            # alike: all share (even with no prompt repeated), or none does.
            prompts = [r["prompt"] for r in rows] or [empty["prompt"]]
            share = self.ranks.all_reduce([float(not can_share(prompts))], "max")[0] == 0
        rows = micro_batch_order(rows, share, cfg.algo.micro_batch_size)  # the fewest tokens to forward
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"entropy": 0.0, "kl": 0.0, "clip": 0.0, "approx_kl": 0.0, "capped": 0.0, "tokens": 0,
                "lp_diff": 0.0, "ratio": 0.0}
        sync_max_diff = -1.0  # -1: no on-policy row
        lp_diff_max, ratio_max, neg_ratio_min = 0.0, 0.0, -math.inf  # over this rank's trained tokens
        mb = cfg.algo.micro_batch_size
        for k in range(micro_batches):
            chunk = rows[k * mb : (k + 1) * mb] or [empty]  # a rank out of rows runs an empty one
            sub = TokenBatch.build(
                prompts=[r["prompt"] for r in chunk],
                completions=[r["completion"] for r in chunk],
                behaviour=[r["behaviour"] for r in chunk],
                pad_id=self.pad_id,
                device=self.device,
                in_loss=[r["in_loss"] for r in chunk],
                share_prompts=share,
                even_unrepeated=self.world > 1,
            )
            advantages = torch.tensor([r["advantage"] for r in chunk], dtype=torch.float32, device=self.device)  # [n]
            on_policy = torch.tensor([r["on_policy"] for r in chunk], device=self.device)  # [n]
            if sub.num_tokens == 0 and self.world == 1:
                continue  # nothing to learn, and no other rank waits on this micro-batch
            self._check()  # a long step on a big model should not delay a worker error or a stop
            logprobs, entropy = token_logprobs(
                self.policy, sub, cfg.gen.temperature, entropy_grad=entropy_coef != 0, autocast=self.autocast,
                sharded=self.world > 1,
            )
            loss, s = policy_loss(  # this micro-batch's share of the batch loss
                logprobs, sub.behaviour_logprobs, advantages, sub.completion_mask,
                clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, is_cap=cfg.algo.is_cap,
                norm=norm, loss_agg=cfg.algo.loss_agg, ratio_level=cfg.algo.ratio_level,
                clip_against=cfg.algo.clip_against,
            )
            total = loss
            if entropy_coef != 0:  # an entropy bonus, aggregated like the loss
                total = total - entropy_coef * aggregate(entropy, sub.completion_mask, cfg.algo.loss_agg, norm)
            if kl_coef != 0:  # a penalty for drifting from the initial policy
                with torch.no_grad():
                    ref_logprobs, _ = token_logprobs(
                        self.reference, sub, cfg.gen.temperature, with_entropy=False, autocast=self.autocast
                    )
                kl = kl_penalty(logprobs, ref_logprobs, cfg.algo.kl_estimator)  # [n, L]
                total = total + kl_coef * aggregate(kl, sub.completion_mask, cfg.algo.loss_agg, norm)
                sums["kl"] += (kl.detach() * sub.completion_mask).sum().item()
            # FSDP averages the gradients over the ranks; each rank's loss is its share of
            # the batch's sum, so scale back up to a sum.
            (total * self.world).backward()
            if sub.num_tokens == 0:
                continue
            # The rollout/training mismatch: the trainer's log-prob of each trained token
            # against the engine's, whatever the staleness (bf16 vs float32, stale weights).
            trained = sub.completion_mask > 0
            log_ratio = (logprobs.detach() - sub.behaviour_logprobs)[trained]  # [tokens]
            sums["lp_diff"] += log_ratio.abs().sum().item()
            sums["ratio"] += log_ratio.exp().sum().item()
            lp_diff_max = max(lp_diff_max, log_ratio.abs().max().item())
            ratio_max = max(ratio_max, log_ratio.exp().max().item())
            neg_ratio_min = max(neg_ratio_min, -log_ratio.exp().min().item())
            if on_policy.any():
                diff = ((logprobs.detach() - sub.behaviour_logprobs).abs() * sub.completion_mask)[on_policy]
                sync_max_diff = max(sync_max_diff, diff.max().item())
            w = sub.num_tokens
            stats[M.LOSS_POLICY] += loss.item()
            sums["entropy"] += (entropy.detach() * sub.completion_mask).sum().item()
            sums["clip"] += s["clip_frac"] * w
            sums["approx_kl"] += s["approx_kl"] * w
            sums["capped"] += s["is_capped_frac"] * w
            stats[M.LOSS_IS_RATIO_MAX] = max(stats[M.LOSS_IS_RATIO_MAX], s["is_ratio_max"])
            sums["tokens"] += w
        # Over the ranks: sums and maxima (one each, whatever the rank count).
        sums["loss"] = stats[M.LOSS_POLICY]
        totals = dict(zip(sums, self.ranks.all_reduce(list(sums.values()), "sum")))
        stats[M.LOSS_POLICY] = totals["loss"]
        stats[M.LOSS_IS_RATIO_MAX], sync_max_diff, lp_diff_max, ratio_max, neg_ratio_min = self.ranks.all_reduce(
            [stats[M.LOSS_IS_RATIO_MAX], sync_max_diff, lp_diff_max, ratio_max, neg_ratio_min], "max"
        )
        trained = max(totals["tokens"], 1)
        stats[M.LOSS_CLIP_FRAC] = totals["clip"] / trained
        stats[M.LOSS_APPROX_KL] = totals["approx_kl"] / trained
        stats[M.LOSS_IS_CAPPED_FRAC] = totals["capped"] / trained
        if totals["tokens"] > 0:
            stats[M.LOSS_ENTROPY] = totals["entropy"] / trained
            stats[M.MISMATCH_LOGPROB_DIFF_MEAN] = totals["lp_diff"] / trained
            stats[M.MISMATCH_LOGPROB_DIFF_MAX] = lp_diff_max
            stats[M.MISMATCH_IS_RATIO_MEAN] = totals["ratio"] / trained
            stats[M.MISMATCH_IS_RATIO_MIN] = -neg_ratio_min
            stats[M.MISMATCH_IS_RATIO_MAX] = ratio_max
            if kl_coef != 0:
                stats[M.LOSS_KL_REF] = totals["kl"] / trained
        if sync_max_diff >= 0:
            stats[M.SYNC_LOGPROB_MAX_DIFF] = sync_max_diff
        stats[M.LOSS_GRAD_NORM] = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.algo.max_grad_norm))
        if not (math.isfinite(stats[M.LOSS_POLICY]) and math.isfinite(stats[M.LOSS_GRAD_NORM])):
            # Nothing non-finite may reach the weights, the engines or a checkpoint.
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite_in_a_row += 1
            log.warning(
                # As text: JSON has no NaN.
                "step_skipped_nonfinite", loss=str(stats[M.LOSS_POLICY]), grad_norm=str(stats[M.LOSS_GRAD_NORM]),
                in_a_row=self._nonfinite_in_a_row, max_nonfinite_steps=cfg.algo.max_nonfinite_steps,
            )
            if self._nonfinite_in_a_row >= cfg.algo.max_nonfinite_steps and self.rank == 0:
                raise NonFiniteSteps(
                    f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                    f"(algo.max_nonfinite_steps={cfg.algo.max_nonfinite_steps}); last: loss "
                    f"{stats[M.LOSS_POLICY]}, grad norm {stats[M.LOSS_GRAD_NORM]}"
                )
            stats[M.LOSS_NONFINITE_SKIPPED] = 1
            return stats
        self._nonfinite_in_a_row = 0
        for group in self.optimizer.param_groups:
            group["lr"] = stats[M.OPTIM_LR]
        self.optimizer.step()
        return stats

    def _sync_weights(self, version: int) -> float:
        """Rank 0: the policy's full weights (gathered from every rank) into the engines'
        shared memory, then every engine loads them; returns the seconds of both."""
        t0 = time.monotonic()
        self.ranks.send("weights", {"dtype": str(self.engine_dtype).removeprefix("torch.")})
        weights = self.engine_weights.write(self.policy)
        self.supervisor.broadcast_weights(weights, version, self.cfg.engine.sync_timeout_s)
        self.engine_weights.mapped()
        return time.monotonic() - t0

    def _follow(self) -> None:
        """Ranks 1..N-1: hold a shard and do what rank 0 says until it says stop
        (trainer/ranks.py lists the commands)."""
        while True:
            command = self.ranks.receive()
            kind = command["kind"]
            if kind == "step":
                self.step = command["step"]  # for this rank's logs
                self._optimizer_step(command["rows"], LossNorm(**command["norm"]), command["micro_batches"])
            elif kind == "weights":
                weights_to_bytes(self.policy, getattr(torch, command["dtype"]), keep=False)
            elif kind == "checkpoint":
                ckpt.full_state(self.policy, self.optimizer)
            elif kind == "model":
                ckpt.full_weights(self.policy)
            elif kind == "stop":
                self.stop_code = command["exit_code"]
                self.ranks.wait_for_main_exit(timeout_s=self.cfg.engine.shutdown_timeout_s + 30)
                return
            else:
                raise RuntimeError(f"rank {self.rank}: unknown command from rank 0: {kind!r}")

    @property
    def failed_worker(self) -> GenerationWorker | None:
        """The worker whose error ended the run, if one did."""
        return self.supervisor.failed_worker if self.supervisor is not None else None

    def _generated_tokens(self) -> int:
        return sum(w.stats["tokens"] for w in self.supervisor.workers)

    def _save_checkpoint(self) -> pathlib.Path:
        """A checkpoint of the current step (once per step)."""
        if self._saved_step == self.step and self.last_checkpoint is not None:
            return self.last_checkpoint
        if self._saved_step == self.step:  # resumed from it and nothing trained since
            return self.resumed_from
        self.ranks.send("checkpoint")  # the other ranks send their shards
        self.last_checkpoint = ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            model=self.policy,
            optimizer=self.optimizer,
            trainer_state={
                "policy_version": self.queue.version,
                "prompts": self.trained.state(),
                "run_id": self.run_id,
            },
            config=self.cfg.to_dict(),
            keep=self.cfg.run.keep_checkpoints,
        )
        self._saved_step = self.step
        return self.last_checkpoint

    # ---- stopping ---------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask the running fit() to stop. The first request finishes the current step (or
        abandons it while it still waits for rollouts), writes a checkpoint, shuts the
        engines down, and fit() raises RunInterrupted(graceful=True). A second one stops
        at the next check, without a checkpoint. SIGINT and SIGTERM call this while
        fit() runs in the main thread; from another thread, call it directly."""
        if self._stop_signal is None:
            self._stop_signal = signum
        self._stop_count += 1

    def _check(self) -> None:
        """Between pieces of work: raise the first worker error, stop at once on a
        second stop request."""
        if self.supervisor is not None:
            self.supervisor.check()
        self.ranks.check_peers()
        if self._stop_count >= 2 and not self._in_cleanup:
            log.warning("stop_now", signal=_signal_name(self._stop_signal), step=self.step)
            raise RunInterrupted(self._stop_signal, graceful=False, step=self.step)

    def _check_waiting(self) -> None:
        """`_check` while waiting (for engines, for rollouts): a first stop request
        abandons the wait."""
        self._check()
        if self._stop_count:
            raise _StopRequested()

    @contextlib.contextmanager
    def _signals_request_stop(self):
        """SIGINT and SIGTERM call request_stop while fit() runs; the previous handlers
        come back afterwards. Python allows signal handlers only in the main thread: from
        another thread nothing is installed (call request_stop())."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signums = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signums}
        for s in signums:
            signal.signal(s, lambda signum, frame: self.request_stop(signum))
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _plot_metrics(self) -> None:
        """RUN_DIR/metrics.png (trainer/plots.py); a plot that fails never fails the run."""
        try:
            log.info("metrics_plotted", path=str(plots.plot_run(self.output_dir)))
        except Exception as e:  # noqa: BLE001 - the model and metrics are saved already
            log.warning("plot_failed", error_type=type(e).__name__, error=str(e))

    def _save_final_model(self, checkpoint: pathlib.Path) -> None:
        """RUN_DIR/model, a Hugging Face model directory: its weights are the final
        checkpoint's file, hard-linked (written once; a copy across file systems)."""
        out = self.output_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        target, tmp = out / "model.safetensors", out / ".model.safetensors.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(checkpoint / ckpt.MODEL, tmp)
        except OSError:
            shutil.copyfile(checkpoint / ckpt.MODEL, tmp)
        os.replace(tmp, target)
        # Not policy.save_pretrained: that writes the weights again (and FSDP renamed the class).
        self.policy.config.save_pretrained(out)
        if self.policy.generation_config is not None:
            self.policy.generation_config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        for path in out.iterdir():
            ckpt.follow_umask(path)  # whatever the libraries that wrote them chose
        log.info("model_saved", path=str(out))

    # ---- cleanup ----------------------------------------------------------------------

    def cleanup(self, failing: bool = False) -> None:
        """Stop the workers and engines (`failing`: the run is ending on an error, so
        the trackers get a short wait); groups generated but never trained on are
        discarded, which returns their permits."""
        if self._bar is not None:
            self._bar.close()
        if self.supervisor is not None:
            self.supervisor.shutdown(timeout=self.cfg.engine.shutdown_timeout_s)
        if self.rewards is not None:
            self.rewards.shutdown()  # kills reward processes; a stuck reward thread is a daemon
        if self.evaluator is not None:
            self.evaluator.shutdown()
        if self.trackers is not None:
            self.trackers.close(timeout_s=10.0 if not failing else 2.0)  # a failing run ends fast
        if self.engine_weights is not None:
            self.engine_weights.close()
        if self.queue is not None:
            discarded = self.queue.discard_queued()
            log.info("capacity_final", discarded_groups=discarded, **self.queue.counters().as_dict())

    def fit(self) -> list[dict[str, Any]]:
        """Set up (resuming per run.resume), train up to run.steps, clean up. Re-raises any
        worker error; raises RunInterrupted after a stop request (see request_stop)."""
        self.history, self.evals = [], []
        self._fit_t0 = time.monotonic()
        self._stop_count, self._stop_signal, self._in_cleanup = 0, None, False
        interrupted, failing = None, False
        context = {"run_id": self.run_id, **({"rank": self.rank} if self.world > 1 else {})}
        if self.rank != 0:
            with structlog.contextvars.bound_contextvars(**context):
                try:
                    self.setup()
                    self._follow()
                except BaseException:
                    self.ranks.abort()
                    raise
                self.ranks.shutdown()
            return self.history
        with structlog.contextvars.bound_contextvars(**context), self._signals_request_stop():
            try:
                try:
                    self.setup()
                    self.train()
                except _StopRequested:
                    log.warning("stopping", step=self.step, reason="stop requested while waiting; step abandoned")
                except QueueClosed:
                    # A worker's error closed the queue, while the trainer waited for a
                    # batch or while it trained on one (then retire() finds it closed):
                    # the run fails with that error, not with the closed queue.
                    if self.supervisor is not None:
                        self.supervisor.check()
                    raise
                if self._stop_count and self.step < self.cfg.run.steps:
                    path = self._save_checkpoint() if self.step > 0 else None
                    interrupted = RunInterrupted(
                        self._stop_signal, graceful=True, step=self.step, checkpoint=str(path) if path else None
                    )
            except BaseException:
                failing = True
                self.ranks.abort()  # the other ranks stop now, not when this process exits
                raise
            finally:
                self._in_cleanup = True
                self.cleanup(failing)
                self._lock.release()
        if interrupted is not None:
            self.ranks.send("stop", {"exit_code": int(interrupted.exit_code)})
            raise interrupted
        # Every permit is back: nothing leaked across the run.
        self.final_counters = self.queue.assert_drained()
        self.ranks.send("stop", {"exit_code": 0})
        self.ranks.shutdown()
        return self.history


def engine_class() -> type:
    """workers.engine.Engine, imported on first use: a rank without engines, or a run that
    stops on bad input, never pays for importing vLLM (~8 s). Tests replace this function
    to build tests/fake_engine.FakeEngine instead."""
    from workers.engine import Engine

    return Engine


def build_engine(cfg: TrainerConfig, model_path: str | os.PathLike, index: int, device_id: int | None = None) -> Any:
    """Engine `index` of a run, as the engine section says (called in its worker thread)."""
    return engine_class()(
        str(model_path),
        index=index,
        kvcache_gib=cfg.engine.kvcache_gib,
        max_model_len=cfg.engine.max_model_len,
        max_num_seqs=cfg.engine.max_num_seqs,
        seed=cfg.run.seed + index,
        dtype=cfg.engine.dtype,
        device_id=device_id,
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _signal_name(signum: int | None) -> str | None:
    return None if signum is None else signal.Signals(signum).name


def _changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two configs (run.resume and run.steps
    are expected to change on a resume and are left out)."""
    changed = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            dotted = f"{section}.{key}"
            if dotted not in ("run.resume", "run.steps") and a.get(key) != b.get(key):
                changed.append(dotted)
    return changed
