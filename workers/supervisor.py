"""The supervisor: starts the generation workers, watches them, re-raises their errors.

Like `concurrent.futures`, a worker's exception becomes a value: the first one is
recorded, the rollout queue is closed with it as the cause (which wakes every blocked
thread), and `check()` raises it in the caller. A broken supervisor refuses new work.

A watchdog thread covers what vLLM does not raise by itself:
* liveness: a dead engine leaves the worker blocked inside `step()` forever, so the
  watchdog polls `engine.is_alive()` and, when it turns false, records
  `EngineDeadError` and wakes the blocked thread (`engine.wake_blocked()`);
* progress: an engine that is alive but produces nothing (SIGSTOPped, deadlocked) for
  `hang_timeout_s` while it has requests in flight fails the run with `EngineHung`,
  after logging every thread's stack.
"""

from __future__ import annotations

import contextvars
import gc
import sys
import threading
import time
import traceback
from typing import Any, Callable

import structlog

from capacity import RolloutQueue
from workers.worker import EvalJob, EvalResult, GenerationWorker, PromptItem, SamplingSpec

log = structlog.get_logger(__name__)


class EngineHung(RuntimeError):
    """An engine with requests in flight made no progress for hang_timeout_s."""


class EngineStartTimeout(RuntimeError):
    """An engine did not finish starting within engine.start_timeout_s."""


class WeightSyncTimeout(RuntimeError):
    """A worker did not acknowledge new weights in time."""


class EvalTimeout(RuntimeError):
    """An evaluation did not finish within its timeout while every engine was healthy."""


class SupervisorBroken(RuntimeError):
    """The supervisor already failed or shut down and refuses new work."""


def log_thread_stacks(reason: str) -> None:
    """One structured event per live thread, with its current stack as a list of frames."""
    # CPython 3.11's sys._current_frames() allocates while holding the runtime's thread
    # list lock; a garbage collection there can deadlock the whole process (seen here with
    # a few hundred threads; CPython gh-106883). No collection while it runs.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        frames = sys._current_frames()
    finally:
        if gc_was_enabled:
            gc.enable()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        if frame is None:
            continue
        stack = [
            {"file": f.filename, "line": f.lineno, "function": f.name, "code": f.line}
            for f in traceback.extract_stack(frame)
        ]
        log.error("thread_stack", reason=reason, thread_name=thread.name, daemon=thread.daemon, stack=stack)


class Supervisor:
    def __init__(
        self,
        queue: RolloutQueue,
        make_worker: Callable[[int, Callable, threading.Event], GenerationWorker],
        count: int,
        hang_timeout_s: float = 60.0,
        watch_interval_s: float = 0.05,
    ):
        self.queue = queue
        self.hang_timeout_s = hang_timeout_s
        self.watch_interval_s = watch_interval_s
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._error_worker: GenerationWorker | None = None
        self._closed = False
        self._stopping = False  # stop_workers() was called
        self._watchdog_stop = threading.Event()
        self.start_gate = threading.Event()  # set once every engine is up
        self.workers: list[GenerationWorker] = [
            make_worker(i, self._record_error, self.start_gate) for i in range(count)
        ]
        self._watchdog: threading.Thread | None = None
        self._evals = 0  # evaluations started: their request ids' tag

    # ---- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker (each builds its engine) and the watchdog. Threads start
        under a copy of the caller's context, so bound log context (run_id) carries over."""
        self._started_at = time.monotonic()
        for w in self.workers:
            w.start()
        ctx = contextvars.copy_context()
        self._watchdog = threading.Thread(
            target=ctx.run, args=(self._watch,), name="watchdog", daemon=True
        )
        self._watchdog.start()

    def wait_ready(
        self, timeout: float, health_check: Callable[[], None] | None = None, open_gate: bool = True
    ) -> None:
        """Wait until every engine is built, then let generation start; raises the first
        worker error meanwhile, and whatever `health_check()` raises (called every 0.1 s).

        open_gate=False keeps generation from starting: the workers already apply their
        inbox (e.g. `broadcast_weights` of a resumed policy), and `open_gate()` lets them go.
        `timeout` counts from start(): the caller may have done other work meanwhile."""
        deadline = self._started_at + timeout
        for w in self.workers:
            while not w.ready.wait(0.1):
                self.check()
                if health_check is not None:
                    health_check()
                if time.monotonic() > deadline:
                    raise EngineStartTimeout(f"{w.name}: engine not started after {timeout:.0f}s")
        self.check()
        if open_gate:
            self.open_gate()

    def open_gate(self) -> None:
        """Let the workers start generating."""
        self.check()
        self.start_gate.set()

    # ---- errors ---------------------------------------------------------------------

    def _record_error(self, worker: GenerationWorker | None, error: BaseException) -> None:
        with self._lock:
            first = self._error is None
            if first:
                self._error = error
                self._error_worker = worker
                where = f"worker {worker.name} (engine {worker.index})" if worker else "watchdog"
                error.add_note(f"raised in {where}")
        if first:
            log.error(
                "worker_failed",
                error_type=type(error).__name__,
                error=str(error),
                worker=worker.name if worker else None,
                engine=worker.index if worker else None,
            )
            self.queue.close(error)  # wakes every acquire and get_batch

    @property
    def failed_worker(self) -> GenerationWorker | None:
        return self._error_worker

    def check(self) -> None:
        """Raise the first worker error in the caller (the original exception, with a
        note naming the worker and engine)."""
        if self._error is not None:
            raise self._error

    # ---- weights --------------------------------------------------------------------

    def broadcast_weights(self, data: Any, version: int, timeout: float) -> float:
        """Hand new weights (a shared-memory handle or safetensors bytes: what
        `Engine.load_weights` takes) to every worker and wait until every engine holds
        them. Returns the seconds it took."""
        if self._closed:
            raise SupervisorBroken("broadcast_weights after shutdown")
        self.check()
        t0 = time.monotonic()
        done = [(w, w.load_weights(data, version)) for w in self.workers]
        deadline = t0 + timeout
        for w, event in done:
            while not event.wait(0.05):
                self.check()
                if not w.is_alive():
                    raise SupervisorBroken(f"{w.name} stopped before loading weights v{version}")
                if time.monotonic() > deadline:
                    raise WeightSyncTimeout(f"{w.name} did not load weights v{version} within {timeout:.0f}s")
        return time.monotonic() - t0

    # ---- evaluation -----------------------------------------------------------------

    def evaluate(
        self,
        prompts: list[PromptItem],
        sampling: SamplingSpec,
        scorer: Any,
        timeout: float,
        health_check: Callable[[], None] | None = None,
    ) -> tuple[dict[int, EvalResult], list[int]]:
        """Sample and score `prompts` on the engines (split evenly, beside the training
        groups; no permit is taken) and wait for all of them, raising the first worker
        error or whatever `health_check()` raises meanwhile. Returns (prompt index ->
        result, prompt indices skipped because their rewards failed)."""
        if self._closed:
            raise SupervisorBroken("evaluate after shutdown")
        self.check()
        self._evals += 1
        jobs = [
            (w, w.evaluate(EvalJob(prompts[i :: len(self.workers)], sampling, scorer, tag=f"eval{self._evals}")))
            for i, w in enumerate(self.workers)
        ]
        deadline = time.monotonic() + timeout
        results: dict[int, EvalResult] = {}
        skipped: list[int] = []
        for w, job in jobs:
            while not job.done.wait(0.05):
                self.check()
                if health_check is not None:
                    health_check()
                if not w.is_alive():
                    self.check()
                    raise SupervisorBroken(f"{w.name} stopped during an evaluation")
                if time.monotonic() > deadline:
                    raise EvalTimeout(
                        f"{w.name}: evaluation of {len(job.prompts)} prompts not done after {timeout:.0f}s "
                        f"({len(job.results)} scored; run.batch_timeout_s)"
                    )
            self.check()
            if job.error is not None:
                raise job.error
            results.update(job.results)
            skipped += job.skipped
        return results, skipped

    # ---- watchdog -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._watchdog_stop.wait(self.watch_interval_s):
            if self._error is not None:
                return
            for w in self.workers:
                engine = w.engine
                if engine is None or not w.is_alive():
                    continue
                if not engine.is_alive():
                    from workers.engine import EngineDeadError  # vLLM's; imported with the engine

                    self._record_error(w, EngineDeadError(f"engine {w.index} died (detected by the watchdog)"))
                    engine.wake_blocked()
                    return
                stalled = time.monotonic() - w.last_progress
                if w.in_flight() and stalled > self.hang_timeout_s:
                    log_thread_stacks(reason=f"engine {w.index} made no progress for {stalled:.1f}s")
                    self._record_error(
                        w,
                        EngineHung(
                            f"engine {w.index} made no progress for {stalled:.1f}s "
                            f"with {w.in_flight()} groups in flight (engine.hang_timeout_s={self.hang_timeout_s})"
                        ),
                    )
                    engine.wake_blocked()
                    return

    # ---- stop -----------------------------------------------------------------------

    def stop_workers(self, keep_queue_open: bool = False) -> None:
        """Tell every worker to stop (each then shuts its engine down in its own thread)
        and close the queue; returns at once. shutdown() joins them. `keep_queue_open`:
        the trainer still holds a batch it will retire (its last step); a later call
        closes the queue. Workers are told once."""
        if not self._stopping:
            self._stopping = True
            log.info("workers_stopping", queue_open=keep_queue_open)
            # The watchdog goes first: engines shutting down on purpose are not failures.
            self._watchdog_stop.set()
            if self._watchdog is not None:
                self._watchdog.join(1.0)
            for w in self.workers:
                w.stop()
        if not keep_queue_open:
            self.queue.close(self._error)  # also wakes a worker blocked in acquire

    def shutdown(self, timeout: float = 30.0) -> list[str]:
        """Close the queue, stop and join the workers (each shuts its engine down), stop
        the watchdog. Returns the names of threads that did not stop in time; their
        engines are shut down from here. A second call does nothing."""
        if self._closed:
            return []
        self._closed = True
        self.stop_workers()
        deadline = time.monotonic() + timeout
        stuck = []
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                stuck.append(w.name)
        for w in self.workers:
            if w.name in stuck and w.engine is not None:
                # The thread is stuck inside a vLLM call: wake it and take the engine down.
                w.engine.wake_blocked()
                w.engine.shutdown()
        if stuck:
            log.error("threads_did_not_stop", threads=stuck, timeout_s=timeout)
        return stuck
