"""The generation worker: one OS thread that owns one vLLM engine.

Loop: apply inbox commands (new weights, stop) -> put the groups whose rewards are in
-> acquire slots while the engine has room (blocking only when it is idle) -> submit one
request of `group_size` samples per slot -> `engine.step()` -> hand finished groups to
the reward pool (workers/rewards.py) and step on. A group's slot stays held while it is
scored; it is put once the rewards are in, or released if they cannot be had.

Evaluation (`evaluate()`) goes through the inbox too: its requests share the engine's
batch with the training groups, hold no slot (no training permit, no effect on the
staleness bound), and are scored by their own reward pool; the job is done once every
prompt is scored. A worker built with `prompts=None` only evaluates (scripts/evaluate.py).

The engine is touched only from this thread (vLLM's engine is not thread-safe); other
threads talk to the worker through its inbox. Any exception ends the thread and is
handed to `on_error` (the supervisor), which re-raises it in the main thread; the
thread's `finally` releases every slot it holds and shuts its engine down.
"""

from __future__ import annotations

import contextvars
import dataclasses
import queue as queue_mod
import threading
import time
from typing import Any, Callable, Protocol

import structlog

from capacity import QueueClosed, ReleaseReason, RolloutQueue, Slot
from workers.rewards import GroupScore, RewardFailed, RewardPool

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class PromptItem:
    index: int  # global prompt index: the cursor position, unique per group
    token_ids: list[int]
    data: Any  # the task's prompt object, handed back to the reward


class PromptSource(Protocol):
    def next(self) -> PromptItem: ...


@dataclasses.dataclass
class SamplingSpec:
    group_size: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # run seed; each request's seed derives from it and the prompt index

    def request_seed(self, prompt_index: int) -> int:
        # Distinct per prompt: the same seed on different prompts gives near-identical draws.
        return (self.seed * 1_000_003 + prompt_index * 7919 + 1) % (2**31 - 1)


class ZeroStdFilter:
    """Dynamic sampling (DAPO), shared by the workers: a group whose rewards are all equal
    carries no advantage, so it is released and another prompt generated in its place, at
    most `per_version` times per policy version (one training step). Past that budget such
    groups go to the batch (they train nothing): a policy that solves, or fails, every
    prompt keeps stepping instead of waiting for a spread that never comes."""

    def __init__(self, per_version: int):
        self.per_version = per_version
        self._lock = threading.Lock()
        self._version = -1
        self._used = 0

    def take(self, version: int) -> bool:
        """True: release this group (budget left at `version`); False: batch it."""
        with self._lock:
            if version != self._version:
                self._version, self._used = version, 0
            if self._used >= self.per_version:
                return False
            self._used += 1
            return True


@dataclasses.dataclass
class RolloutGroup:
    """One prompt's `group_size` completions, scored: the unit the trainer consumes."""

    prompt_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]  # [G][len_i]
    behaviour_logprobs: list[list[float]]  # [G][len_i]: log-prob of each sampled token
    texts: list[str]
    finish_reasons: list[str | None]
    rewards: list[float]  # [G]: the weighted sum of the reward functions
    reward_terms: dict[str, list[float]]  # reward function name -> [G] its values
    start_version: int  # policy version when the slot was acquired
    weight_versions: tuple[int, int]  # engine weight versions at submit and at finish
    worker: str
    engine: int
    gen_s: float  # submit to finish


@dataclasses.dataclass
class _LoadWeights:
    data: Any  # Engine.load_weights' argument: a SharedWeightsHandle or safetensors bytes
    version: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class EvalJob:
    """One worker's share of an evaluation: its prompts, sampled and scored.

    Filled by the worker thread; the caller waits on `done` (with health checks: a worker
    that dies sets `error` and `done`). `results`: prompt index -> EvalResult."""

    def __init__(self, prompts: list[PromptItem], sampling: SamplingSpec, scorer: RewardPool, tag: str):
        self.prompts = prompts
        self.sampling = sampling
        self.scorer = scorer
        self.tag = tag  # request ids are f"{tag}-{prompt index}": unique beside training's
        self.results: dict[int, EvalResult] = {}
        self.skipped: list[int] = []  # prompts whose rewards failed (reward.on_error=skip)
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _finish_one(self) -> None:
        if len(self.results) + len(self.skipped) == len(self.prompts):
            self.done.set()


@dataclasses.dataclass
class EvalResult:
    rewards: list[float]  # [k]
    lengths: list[int]  # [k]: completion tokens
    texts: list[str]  # [k]


@dataclasses.dataclass
class _EvalActive:
    job: EvalJob
    prompt: PromptItem


@dataclasses.dataclass
class _EvalScoring:
    job: EvalJob
    prompt: PromptItem
    out: Any  # workers.engine.FinishedRequest
    score: GroupScore


_STOP = object()


@dataclasses.dataclass
class _Active:
    slot: Slot
    prompt: PromptItem
    version_at_submit: int
    t0: float


@dataclasses.dataclass
class _Scoring:
    """A finished group whose rewards are being computed; its slot is still held."""

    active: _Active
    out: Any  # workers.engine.FinishedRequest
    score: GroupScore
    weight_versions: tuple[int, int]  # at submit and at finish
    gen_s: float


class GenerationWorker(threading.Thread):
    SHUTDOWN_S = 10.0  # engine shutdown bound (it kills the engine's processes)
    def __init__(
        self,
        index: int,
        build_engine: Callable[[], Any],
        queue: RolloutQueue,
        prompts: PromptSource | None,
        sampling: SamplingSpec,
        rewards: RewardPool,
        max_groups_in_flight: int,
        on_error: Callable[[GenerationWorker, BaseException], None],
        first_batch_share: int | None = None,
        start_gate: threading.Event | None = None,
        poll_s: float = 0.05,
        filter_zero_std: ZeroStdFilter | None = None,
    ):
        super().__init__(name=f"gen-{index}", daemon=True)
        self.index = index
        self._build_engine = build_engine
        self._queue = queue
        self._prompts = prompts
        self._sampling = sampling
        self._rewards = rewards
        self._max_groups = max(1, max_groups_in_flight)
        # Until the trainer takes its first batch, generate at most this engine's share of
        # it at once: every permit is free at the start, and an engine generating all of
        # them side by side (decode cost grows with the batch on a CPU) delivers the first
        # batch only when (max_staleness + 1) batches are nearly done.
        self._first_batch_share = None if first_batch_share is None else max(1, first_batch_share)
        self._on_error = on_error
        self._start_gate = start_gate  # generation starts once it is set
        self._poll_s = poll_s
        self._filter_zero_std = filter_zero_std  # releases groups whose rewards are all equal
        self._filtered: queue_mod.SimpleQueue = queue_mod.SimpleQueue()  # their prompt indices
        self._inbox: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._active: dict[str, _Active] = {}  # request id -> group the engine generates
        self._scoring: list[_Scoring] = []  # groups generated, rewards not in yet
        self._eval_active: dict[str, _EvalActive] = {}  # request id -> eval prompt generated
        self._eval_scoring: list[_EvalScoring] = []  # eval prompts generated, rewards not in yet
        self._stopping = False
        self.engine: Any = None  # set once built; read by the watchdog
        self.ready = threading.Event()  # engine built (or the thread failed first)
        self.weight_version = 0
        self.last_progress = time.monotonic()  # last return from step(); for the hang watchdog
        self.stats = {"groups": 0, "tokens": 0, "skipped": 0, "filtered": 0, "weight_loads": 0, "eval_prompts": 0}

    # ---- called from other threads ------------------------------------------------

    def load_weights(self, data: Any, version: int) -> threading.Event:
        """Queue new weights; the returned event is set once the engine holds them."""
        cmd = _LoadWeights(data, version)
        self._inbox.put(cmd)
        return cmd.done

    def evaluate(self, job: EvalJob) -> EvalJob:
        """Queue an evaluation; `job.done` is set once each of its prompts is scored."""
        self._inbox.put(job)
        return job

    def stop(self) -> None:
        """Stop after the current engine step (then shut the engine down)."""
        self._inbox.put(_STOP)

    def in_flight(self) -> int:
        """Requests the engine is generating (training groups and eval prompts)."""
        return len(self._active) + len(self._eval_active)

    def take_filtered(self) -> list[int]:
        """Prompt indices of the groups released as filtered since the last call."""
        taken = []
        while True:
            try:
                taken.append(self._filtered.get_nowait())
            except queue_mod.Empty:
                return taken

    # ---- the thread -----------------------------------------------------------------

    def start(self) -> None:
        # Run under a copy of the starter's context, so its bound log fields (run_id)
        # carry over into this thread's log lines.
        self._context = contextvars.copy_context()
        super().start()

    def run(self) -> None:
        self._context.run(self._run)

    def _run(self) -> None:
        structlog.contextvars.bind_contextvars(worker=self.name, engine=self.index)
        try:
            log.info("engine_starting")
            self.engine = self._build_engine()
            self.ready.set()
            # Wait for the other engines, so that the first one up does not take every slot.
            while self._start_gate is not None and not self._start_gate.wait(self._poll_s):
                self._apply_inbox()
                if self._stopping:
                    return
            log.info(
                "worker_started", max_groups_in_flight=self._max_groups, engine_pids=self.engine.process_pids()
            )
            while not self._stopping:
                self._apply_inbox()
                if self._stopping:
                    break
                self._put_scored()
                self._put_eval_scored()
                if not self._fill():
                    continue
                finished = self.engine.step()
                self.last_progress = time.monotonic()
                for out in finished:
                    if out.request_id in self._eval_active:
                        self._score_eval(out)
                    else:
                        self._score(out)
        except QueueClosed:
            pass  # shutdown, or another thread failed first: nothing to report from here
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, never swallowed
            self._on_error(self, e)
        finally:
            self.ready.set()
            self._release_all(ReleaseReason.CANCELLED)
            if self.engine is not None:
                self.engine.shutdown(timeout=self.SHUTDOWN_S)
            log.info("worker_stopped", **self.stats)

    def _apply_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue_mod.Empty:
                return
            if cmd is _STOP:
                self._stopping = True
                return
            if isinstance(cmd, EvalJob):
                self._submit_eval(cmd)
                continue
            t0 = time.monotonic()
            self.engine.load_weights(cmd.data, cmd.version)
            self.weight_version = cmd.version
            self.stats["weight_loads"] += 1
            cmd.done.set()
            log.debug("weights_loaded", version=cmd.version, seconds=time.monotonic() - t0)

    def _fill(self) -> bool:
        """Start groups while the engine has room. Returns whether anything is running."""
        if self._prompts is None:  # an eval-only worker: nothing to acquire
            if not self._eval_active:
                time.sleep(self._poll_s)
            return bool(self._eval_active)
        limit = self._max_groups
        if self._first_batch_share is not None and not self._queue.batch_taken:
            limit = min(limit, self._first_batch_share)
        while len(self._active) < limit:
            # Block (briefly, so the inbox stays responsive) only when the engine is idle.
            slot = self._queue.acquire(timeout=0 if self._active or self._eval_active else self._poll_s)
            if slot is None:
                break
            if not self._active:
                self.last_progress = time.monotonic()  # idle until now: not a hang
            try:
                prompt = self._prompts.next()
                rid = f"{self.index}-{prompt.index}"
                self.engine.submit(
                    rid,
                    prompt.token_ids,
                    n=self._sampling.group_size,
                    max_tokens=self._sampling.max_tokens,
                    temperature=self._sampling.temperature,
                    top_p=self._sampling.top_p,
                    seed=self._sampling.request_seed(prompt.index),
                )
            except BaseException:
                slot.release(ReleaseReason.FAILED)
                raise
            self._active[rid] = _Active(slot, prompt, self.weight_version, time.monotonic())
        return bool(self._active or self._eval_active)

    def _submit_eval(self, job: EvalJob) -> None:
        if not job.prompts:
            job.done.set()
        if not self._eval_active and not self._active:
            self.last_progress = time.monotonic()  # idle until now: not a hang
        sp = job.sampling
        for prompt in job.prompts:
            rid = f"{job.tag}-{prompt.index}"
            self.engine.submit(
                rid, prompt.token_ids, n=sp.group_size, max_tokens=sp.max_tokens,
                temperature=sp.temperature, top_p=sp.top_p, seed=sp.request_seed(prompt.index),
            )
            self._eval_active[rid] = _EvalActive(job, prompt)

    def _score_eval(self, out: Any) -> None:
        active = self._eval_active.pop(out.request_id)
        texts = [c.text for c in out.completions]
        score = active.job.scorer.score(texts, active.prompt.data, active.prompt.index)
        self._eval_scoring.append(_EvalScoring(active.job, active.prompt, out, score))

    def _put_eval_scored(self) -> None:
        for scoring in [s for s in self._eval_scoring if s.score.done()]:
            self._eval_scoring.remove(scoring)
            job, comps = scoring.job, scoring.out.completions
            scored = _rewards_or_skip(scoring.score, job.scorer, "reward_failed_eval_prompt_skipped")
            if scored is None:
                job.skipped.append(scoring.prompt.index)
                job._finish_one()
                continue
            rewards, _ = scored
            self.stats["eval_prompts"] += 1
            job.results[scoring.prompt.index] = EvalResult(
                rewards=list(rewards), lengths=[len(c.token_ids) for c in comps], texts=[c.text for c in comps]
            )
            job._finish_one()

    def _score(self, out: Any) -> None:
        """Hand a finished group to the reward pool; the engine steps on meanwhile."""
        active = self._active.pop(out.request_id)
        score = self._rewards.score([c.text for c in out.completions], active.prompt.data, active.prompt.index)
        self._scoring.append(
            _Scoring(active, out, score, (active.version_at_submit, self.weight_version), time.monotonic() - active.t0)
        )

    def _put_scored(self) -> None:
        """Put every group whose rewards are in; a group whose rewards cannot be had
        is skipped (reward.on_error=skip: its permit returns) or fails the run."""
        for scoring in [s for s in self._scoring if s.score.done()]:
            self._scoring.remove(scoring)
            active, comps = scoring.active, scoring.out.completions
            with active.slot as slot:
                scored = _rewards_or_skip(scoring.score, self._rewards, "reward_failed_group_skipped")
                if scored is None:
                    slot.release(ReleaseReason.FAILED)
                    self.stats["skipped"] += 1
                    continue
                rewards, terms = scored
                if (
                    self._filter_zero_std is not None
                    and len(set(rewards)) == 1
                    and self._filter_zero_std.take(self._queue.version)
                ):
                    slot.release(ReleaseReason.FILTERED)
                    self.stats["filtered"] += 1
                    self.stats["tokens"] += sum(len(c.token_ids) for c in comps)
                    self._filtered.put(active.prompt.index)
                    continue
                group = RolloutGroup(
                    prompt_index=active.prompt.index,
                    prompt_token_ids=list(scoring.out.prompt_token_ids),
                    completion_token_ids=[list(c.token_ids) for c in comps],
                    behaviour_logprobs=[list(c.logprobs) for c in comps],
                    texts=[c.text for c in comps],
                    finish_reasons=[c.finish_reason for c in comps],
                    rewards=rewards,
                    reward_terms=terms,
                    start_version=slot.version,
                    weight_versions=scoring.weight_versions,
                    worker=self.name,
                    engine=self.index,
                    gen_s=scoring.gen_s,
                )
                self.stats["groups"] += 1
                self.stats["tokens"] += sum(len(c.token_ids) for c in comps)
                slot.put(group)

    def _release_all(self, reason: ReleaseReason) -> None:
        if (self._active or self._eval_active) and self.engine is not None:
            try:
                self.engine.abort([*self._active, *self._eval_active])
            except Exception:  # noqa: BLE001 - the engine may be dead; the slots matter more
                pass
        for job in {id(a.job): a.job for a in [*self._eval_active.values(), *self._eval_scoring]}.values():
            job.error = job.error or RuntimeError(f"{self.name} stopped before the evaluation finished")
            job.done.set()
        for scoring in self._eval_scoring:
            scoring.score.cancel()
        self._eval_active.clear()
        self._eval_scoring.clear()
        for scoring in self._scoring:
            scoring.score.cancel()
        for active in [*self._active.values(), *(s.active for s in self._scoring)]:
            if active.slot.held:
                active.slot.release(reason)
        self._active.clear()
        self._scoring.clear()


def _rewards_or_skip(score: GroupScore, pool: RewardPool, event: str) -> tuple[list[float], dict] | None:
    """A scored group's (rewards, terms); None when they cannot be had and the pool's
    reward.on_error is "skip" (logged as `event`); otherwise the RewardFailed is raised."""
    try:
        return score.result()
    except RewardFailed as e:
        score.cancel()
        if pool.spec.on_error != "skip":
            raise
        log.warning(event, error_type=type(e).__name__, error=str(e), **e.log_fields)
        return None
