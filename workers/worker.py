"""The generation worker: one OS thread that owns one vLLM engine.

Loop: apply inbox commands (new weights, stop) -> acquire slots while the engine has
room (blocking only when it is idle) -> submit one request of `group_size` samples per
slot -> `engine.step()` -> score finished groups -> `slot.put(group)`.

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
import tenacity

from capacity import QueueClosed, ReleaseReason, RolloutQueue, Slot

log = structlog.get_logger(__name__)


class TransientRewardError(Exception):
    """Raise from a reward function for errors worth retrying (a flaky verifier)."""


class RewardFailed(RuntimeError):
    """A reward function failed after its last attempt; the group cannot be scored."""


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


@dataclasses.dataclass
class RewardSpec:
    fn: Callable[[str, Any], float]  # (completion text, prompt data) -> reward
    max_attempts: int = 3
    wait_s: float = 0.05  # first retry wait; doubles per attempt
    on_error: str = "fail"  # "fail" the run or "skip" the group


@dataclasses.dataclass
class RolloutGroup:
    """One prompt's `group_size` completions, scored: the unit the trainer consumes."""

    prompt_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]  # [G][len_i]
    behaviour_logprobs: list[list[float]]  # [G][len_i]: log-prob of each sampled token
    texts: list[str]
    finish_reasons: list[str | None]
    rewards: list[float]  # [G]
    start_version: int  # policy version when the slot was acquired
    weight_versions: tuple[int, int]  # engine weight versions at submit and at finish
    worker: str
    engine: int
    gen_s: float  # submit to finish


@dataclasses.dataclass
class _LoadWeights:
    data: bytes  # safetensors
    version: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


_STOP = object()


@dataclasses.dataclass
class _Active:
    slot: Slot
    prompt: PromptItem
    version_at_submit: int
    t0: float


class GenerationWorker(threading.Thread):
    SHUTDOWN_S = 10.0  # engine shutdown bound after a clean stop
    FAILED_SHUTDOWN_S = 2.0  # ... and after the engine failed
    def __init__(
        self,
        index: int,
        build_engine: Callable[[], Any],
        queue: RolloutQueue,
        prompts: PromptSource,
        sampling: SamplingSpec,
        reward: RewardSpec,
        max_groups_in_flight: int,
        on_error: Callable[[GenerationWorker, BaseException], None],
        start_gate: threading.Event | None = None,
        poll_s: float = 0.05,
    ):
        super().__init__(name=f"gen-{index}", daemon=True)
        self.index = index
        self._build_engine = build_engine
        self._queue = queue
        self._prompts = prompts
        self._sampling = sampling
        self._reward = reward
        self._max_groups = max(1, max_groups_in_flight)
        self._on_error = on_error
        self._start_gate = start_gate  # generation starts once it is set
        self._poll_s = poll_s
        self._inbox: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._active: dict[str, _Active] = {}
        self._stopping = False
        self.engine: Any = None  # set once built; read by the watchdog
        self.ready = threading.Event()  # engine built (or the thread failed first)
        self.weight_version = 0
        self.last_progress = time.monotonic()  # last return from step(); for the hang watchdog
        self.stats = {"groups": 0, "tokens": 0, "skipped": 0, "weight_loads": 0}

    # ---- called from other threads ------------------------------------------------

    def load_weights(self, data: bytes, version: int) -> threading.Event:
        """Queue new weights; the returned event is set once the engine holds them."""
        cmd = _LoadWeights(data, version)
        self._inbox.put(cmd)
        return cmd.done

    def stop(self) -> None:
        self._inbox.put(_STOP)

    def in_flight(self) -> int:
        return len(self._active)

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
        failed = False
        try:
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
                if not self._fill():
                    continue
                finished = self.engine.step()
                self.last_progress = time.monotonic()
                for out in finished:
                    self._finish(out)
        except QueueClosed:
            pass  # shutdown, or another thread failed first: nothing to report from here
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, never swallowed
            failed = True
            self._on_error(self, e)
        finally:
            self.ready.set()
            self._release_all(ReleaseReason.CANCELLED)
            if self.engine is not None:
                # A failed engine (dead, or stopped and unable to act on SIGTERM) is not
                # worth a graceful wait: its processes are killed by PID after this.
                self.engine.shutdown(timeout=self.FAILED_SHUTDOWN_S if failed else self.SHUTDOWN_S)
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
            t0 = time.monotonic()
            self.engine.load_weights(cmd.data, cmd.version)
            self.weight_version = cmd.version
            self.stats["weight_loads"] += 1
            cmd.done.set()
            log.debug("weights_loaded", version=cmd.version, seconds=time.monotonic() - t0)

    def _fill(self) -> bool:
        """Start groups while the engine has room. Returns whether anything is running."""
        while len(self._active) < self._max_groups:
            # Block (briefly, so the inbox stays responsive) only when the engine is idle.
            slot = self._queue.acquire(timeout=0 if self._active else self._poll_s)
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
        return bool(self._active)

    def _finish(self, out: Any) -> None:
        active = self._active.pop(out.request_id)
        with active.slot as slot:
            comps = out.completions
            texts = [c.text for c in comps]
            rewards = self._score(texts, active.prompt)
            if rewards is None:
                slot.release(ReleaseReason.FAILED)
                self.stats["skipped"] += 1
                return
            group = RolloutGroup(
                prompt_index=active.prompt.index,
                prompt_token_ids=list(out.prompt_token_ids),
                completion_token_ids=[list(c.token_ids) for c in comps],
                behaviour_logprobs=[list(c.logprobs) for c in comps],
                texts=texts,
                finish_reasons=[c.finish_reason for c in comps],
                rewards=rewards,
                start_version=slot.version,
                weight_versions=(active.version_at_submit, self.weight_version),
                worker=self.name,
                engine=self.index,
                gen_s=time.monotonic() - active.t0,
            )
            self.stats["groups"] += 1
            self.stats["tokens"] += sum(len(c.token_ids) for c in comps)
            slot.put(group)

    def _score(self, texts: list[str], prompt: PromptItem) -> list[float] | None:
        """Rewards for a group; transient errors retried. None when skipped."""
        spec = self._reward

        def log_retry(state: tenacity.RetryCallState) -> None:
            log.warning(
                "reward_retry",
                attempt=state.attempt_number,
                wait_s=round(state.next_action.sleep, 3),
                error=repr(state.outcome.exception()),
                prompt_index=prompt.index,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(spec.max_attempts),
            wait=tenacity.wait_exponential(multiplier=spec.wait_s, max=2.0),
            retry=tenacity.retry_if_exception_type(TransientRewardError),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            return [float(retrying(spec.fn, t, prompt.data)) for t in texts]
        except Exception as e:
            if spec.on_error == "skip":
                log.warning("reward_failed_group_skipped", error=repr(e), prompt_index=prompt.index)
                return None
            raise RewardFailed(f"reward failed for prompt {prompt.index}: {e!r}") from e

    def _release_all(self, reason: ReleaseReason) -> None:
        if self._active and self.engine is not None:
            try:
                self.engine.abort(list(self._active))
            except Exception:  # noqa: BLE001 - the engine may be dead; the slots matter more
                pass
        for active in self._active.values():
            if active.slot.held:
                active.slot.release(reason)
        self._active.clear()
