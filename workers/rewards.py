"""Rewards: user code, run off the engine's thread in a bounded pool, each call timed.

Rewards are slow, flaky, sometimes stuck, sometimes NaN. The generation worker hands a
finished group to `RewardPool.score()` and goes back to stepping its engine; the group's
slot stays held until the scores are in. The pool has `workers` scorer threads; each
runs one call at a time (one reward function on one completion, or a group-level
function on the whole group) through its *runner*:

* `thread` executor: the call runs in a helper daemon thread and the scorer waits for
  it at most `timeout_s`. A call past that is abandoned (Python cannot kill a thread):
  the helper is left to finish on its own, counted in `abandoned_threads`, and a fresh
  one takes its place.
* `process` executor: the call runs in a spawned child process (the functions are
  pickled into it once); a call past `timeout_s` gets the process SIGKILLed and a
  fresh one started. For rewards that hold the GIL, or that may never return.

A call past its timeout raises `RewardTimeout`; `TransientRewardError` (raised by the
user's function) and `RewardTimeout` are retried with tenacity (`max_attempts`,
exponential wait); a value that is not a finite number is `RewardInvalid` and not
retried. Every error names the reward function, the prompt index and how long the call
ran. `async def` functions are run to completion in the runner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import inspect
import math
import multiprocessing
import numbers
import os
import pickle
import queue as queue_mod
import signal
import threading
import time
from typing import Any, Callable, Sequence

import structlog
import tenacity

log = structlog.get_logger(__name__)


class TransientRewardError(Exception):
    """Raise from a reward function for errors worth retrying (a flaky verifier)."""


class RewardFailed(RuntimeError):
    """A reward call failed after its last attempt: the group cannot be scored.
    `function`, `prompt_index` and `ran_s` (how long the last attempt ran) say which."""

    def __init__(self, message: str, function: str, prompt_index: int, ran_s: float, attempts: int = 1):
        super().__init__(f"reward {function!r} for prompt {prompt_index}: {message} (the call ran {ran_s:.2f}s)")
        self.function = function
        self.prompt_index = prompt_index
        self.ran_s = ran_s
        self.attempts = attempts

    @property
    def log_fields(self) -> dict[str, Any]:
        """Fields for the final `run_failed` event."""
        return {
            "reward_function": self.function, "prompt_index": self.prompt_index,
            "reward_ran_s": round(self.ran_s, 3), "reward_attempts": self.attempts,
        }


class RewardTimeout(RewardFailed):
    """A reward call ran past reward.timeout_s."""


class RewardInvalid(RewardFailed):
    """A reward function returned NaN, an infinity, or something that is not a number."""


@dataclasses.dataclass
class RewardFunction:
    name: str  # logged as reward/<name>/mean
    fn: Callable[..., Any]  # (text, prompt) -> float, or group: (texts, prompt) -> [float]
    weight: float = 1.0  # the reward is the weighted sum over functions
    group: bool = False  # called once per group with every completion (judges, ranking)


@dataclasses.dataclass
class RewardSpec:
    functions: list[RewardFunction]
    executor: str = "thread"  # "thread" | "process"
    workers: int = 8  # calls running at once
    timeout_s: float = 10.0  # per call
    max_attempts: int = 3
    wait_s: float = 0.05  # first retry wait; doubles per attempt
    on_error: str = "fail"  # "fail" the run or "skip" the group


@dataclasses.dataclass
class _Call:
    fn_index: int
    args: tuple  # (text, prompt data) or (texts, prompt data)
    prompt_index: int
    future: concurrent.futures.Future


class GroupScore:
    """The rewards of one group, being computed: poll `done()`, then `result()` returns
    (rewards [G], per-function values {name: [G]}) or raises the first RewardFailed."""

    def __init__(self, functions: list[RewardFunction], size: int, futures: list[tuple[int, int | None, concurrent.futures.Future]]):
        self._functions = functions
        self._size = size
        self._futures = futures  # (function index, sample index or None for a group call, future)

    def done(self) -> bool:
        # Done as soon as every call finished, or one failed: the group is lost either way.
        return all(f.done() for _, _, f in self._futures) or any(
            f.done() and f.exception() is not None for _, _, f in self._futures
        )

    def result(self) -> tuple[list[float], dict[str, list[float]]]:
        terms = {fn.name: [0.0] * self._size for fn in self._functions}
        for fi, si, f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        for fi, si, f in self._futures:
            name, value = self._functions[fi].name, f.result()
            if si is None:
                terms[name] = list(value)
            else:
                terms[name][si] = value
        rewards = [sum(fn.weight * terms[fn.name][i] for fn in self._functions) for i in range(self._size)]
        return rewards, terms

    def cancel(self) -> None:
        for _, _, f in self._futures:
            f.cancel()


_STOP = object()


class RewardPool:
    """`workers` scorer threads running reward calls with a timeout each; see the module
    docstring. `score()` never blocks. `shutdown()` stops the scorers and kills the
    reward processes; a thread stuck in a reward is a daemon and cannot hold the
    process up."""

    def __init__(self, spec: RewardSpec):
        self.spec = spec
        self._calls: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"calls": 0, "timeouts": 0, "retries": 0, "invalid": 0, "failed": 0, "abandoned_threads": 0}
        self._payload = _pickle_functions(spec.functions) if spec.executor == "process" else None
        self._scorers: list[_Scorer] = []
        self.threads: list[threading.Thread] = []  # the scorer threads

    def start(self) -> RewardPool:
        ctx = contextvars.copy_context()  # log context (run_id) carries into the scorers
        for i in range(self.spec.workers):
            scorer = _Scorer(self, i)
            self._scorers.append(scorer)
            thread = threading.Thread(target=ctx.copy().run, args=(scorer.run,), name=f"reward-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def score(self, texts: Sequence[str], prompt_data: Any, prompt_index: int) -> GroupScore:
        """Queue every call that scoring this group takes."""
        if self._closed:
            raise RuntimeError("reward pool is shut down")
        futures = []
        for fi, fn in enumerate(self.spec.functions):
            if fn.group:
                calls = [(None, (list(texts), prompt_data))]
            else:
                calls = [(si, (text, prompt_data)) for si, text in enumerate(texts)]
            for si, args in calls:
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._calls.put(_Call(fi, args, prompt_index, future))
                futures.append((fi, si, future))
        return GroupScore(self.spec.functions, len(texts), futures)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def process_pids(self) -> list[int]:
        return [s.runner.pid for s in self._scorers if isinstance(s.runner, _ProcessRunner) and s.runner.pid]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Calls nobody will run: cancelled (their groups' slots are released by the
        # workers). Then one sentinel per scorer, so that every scorer thread ends.
        while True:
            try:
                self._calls.get_nowait().future.cancel()
            except queue_mod.Empty:
                break
        for _ in self._scorers:
            self._calls.put(_STOP)
        for scorer in self._scorers:
            scorer.runner.close()


class _Scorer:
    """One scorer thread: takes calls, runs each through its runner with retries."""

    def __init__(self, pool: RewardPool, index: int):
        self.pool = pool
        self.index = index
        spec = pool.spec
        self.runner = _ProcessRunner(pool._payload, index) if spec.executor == "process" else _ThreadRunner(pool, index)

    def run(self) -> None:
        if isinstance(self.runner, _ProcessRunner):
            try:  # started ahead, so that no call's time includes the child's start
                self.runner.start()
            except Exception as e:  # noqa: BLE001 - the first call tries again and reports it
                log.warning("reward_process_start_failed", scorer=self.index, error=repr(e))
        while True:
            call = self.pool._calls.get()
            if call is _STOP or self.pool._closed:
                if call is not _STOP:
                    call.future.cancel()
                return
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                value = self._attempts(call)
            except RewardFailed as e:
                self.pool.count("failed")
                call.future.set_exception(e)
            except BaseException as e:  # noqa: BLE001 - a bug here must reach the group, not vanish
                call.future.set_exception(e)
            else:
                call.future.set_result(value)

    def _attempts(self, call: _Call) -> Any:
        """One call with its retries (tenacity): transient errors and timeouts are
        retried up to reward.max_attempts; the last error is raised as a RewardFailed."""
        spec = self.pool.spec
        fn = spec.functions[call.fn_index]
        last_ran = [0.0]  # how long the latest attempt ran, for the error

        def attempt() -> Any:
            t0 = time.monotonic()
            self.pool.count("calls")
            try:
                value = self.runner.run(call.fn_index, call.args, spec.timeout_s)
            except _Timeout:
                last_ran[0] = time.monotonic() - t0
                self.pool.count("timeouts")
                log.warning(
                    "reward_timeout", reward_function=fn.name, prompt_index=call.prompt_index,
                    ran_s=round(last_ran[0], 3), timeout_s=spec.timeout_s, executor=spec.executor,
                )
                raise RewardTimeout(
                    f"no result within reward.timeout_s={spec.timeout_s}", fn.name, call.prompt_index, last_ran[0]
                ) from None
            except TransientRewardError:
                last_ran[0] = time.monotonic() - t0
                raise
            except Exception as e:
                last_ran[0] = time.monotonic() - t0
                raise RewardFailed(repr(e), fn.name, call.prompt_index, last_ran[0]) from e
            last_ran[0] = time.monotonic() - t0
            size = len(call.args[0]) if fn.group else None
            return _check_value(value, fn, size, call.prompt_index, last_ran[0])

        def log_retry(state: tenacity.RetryCallState) -> None:
            self.pool.count("retries")
            log.warning(
                "reward_retry", reward_function=fn.name, attempt=state.attempt_number,
                wait_s=round(state.next_action.sleep, 3), error=repr(state.outcome.exception()),
                prompt_index=call.prompt_index,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(spec.max_attempts),
            wait=tenacity.wait_exponential(multiplier=spec.wait_s, max=2.0),
            retry=tenacity.retry_if_exception_type((TransientRewardError, RewardTimeout)),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except TransientRewardError as e:  # still failing after the last attempt
            raise RewardFailed(repr(e), fn.name, call.prompt_index, last_ran[0], spec.max_attempts) from e
        except RewardFailed as e:
            e.attempts = int(retrying.statistics.get("attempt_number", 1))
            if isinstance(e, RewardInvalid):
                self.pool.count("invalid")
            raise


def _check_value(value: Any, fn: RewardFunction, group_size: int | None, prompt_index: int, ran_s: float) -> Any:
    """A finite float (or, for a group function, a list of `group_size` of them); else
    RewardInvalid naming the function and the value."""

    def one(v: Any) -> float:
        if isinstance(v, numbers.Real) and math.isfinite(float(v)):
            return float(v)
        raise RewardInvalid(
            f"returned {v!r} ({type(v).__name__}): a reward must be a finite number", fn.name, prompt_index, ran_s
        )

    if group_size is None:
        return one(value)
    try:
        values = list(value)
    except TypeError:
        raise RewardInvalid(f"group function returned {value!r}, not a list of {group_size} numbers", fn.name, prompt_index, ran_s) from None
    if len(values) != group_size:
        raise RewardInvalid(f"group function returned {len(values)} values for {group_size} completions", fn.name, prompt_index, ran_s)
    return [one(v) for v in values]


def _invoke(fn: Callable[..., Any], args: tuple) -> Any:
    """Call a reward function; an `async def` one is run to completion here."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


class _Timeout(Exception):
    pass


# ---- thread runner ----------------------------------------------------------------------


class _ThreadRunner:
    """Runs calls in one helper daemon thread; on a timeout the helper is abandoned (it
    exits when its call returns, if ever) and the next call gets a fresh one."""

    def __init__(self, pool: RewardPool, index: int):
        self._pool = pool
        self._index = index
        self._generation = 0
        self._inbox: queue_mod.SimpleQueue | None = None

    def _helper(self) -> queue_mod.SimpleQueue:
        if self._inbox is None:
            self._generation += 1
            inbox: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
            ctx = contextvars.copy_context()
            threading.Thread(
                target=ctx.run, args=(_thread_helper, inbox, self._pool.spec.functions),
                name=f"reward-{self._index}-call-{self._generation}", daemon=True,
            ).start()
            self._inbox = inbox
        return self._inbox

    def run(self, fn_index: int, args: tuple, timeout: float) -> Any:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._helper().put((fn_index, args, done))
        try:
            return done.result(timeout)
        except concurrent.futures.TimeoutError:
            self._inbox.put(_STOP)  # exit once the stuck call returns
            self._inbox = None
            self._pool.count("abandoned_threads")
            raise _Timeout() from None

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.put(_STOP)
            self._inbox = None


def _thread_helper(inbox: queue_mod.SimpleQueue, functions: list[RewardFunction]) -> None:
    while True:
        item = inbox.get()
        if item is _STOP:
            return
        fn_index, args, done = item
        try:
            done.set_result(_invoke(functions[fn_index].fn, args))
        except BaseException as e:  # noqa: BLE001 - handed to the scorer
            done.set_exception(e)


# ---- process runner ---------------------------------------------------------------------

_PROCESS_START_TIMEOUT_S = 120.0  # a spawned child imports the reward functions' modules


def _pickle_functions(functions: list[RewardFunction]) -> bytes:
    fns = [f.fn for f in functions]
    try:
        return pickle.dumps(fns)
    except Exception as e:
        from trainer.errors import ConfigError  # noqa: PLC0415 - config errors have one home

        raise ConfigError(
            f"reward.executor=process: the reward functions must pickle into a child process, and "
            f"{[f.name for f in functions]} do not: {e!r} (use reward.executor=thread, or module-level "
            "functions and picklable task objects)",
            key="reward.executor",
        ) from e


class _ProcessRunner:
    """Runs calls in one spawned child process; on a timeout (or a crash) the child is
    killed and the next call starts a fresh one. The child was started ahead and has
    loaded the functions before a call's clock starts."""

    def __init__(self, payload: bytes, index: int):
        self._payload = payload
        self._index = index
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self.pid: int | None = None

    def start(self) -> None:
        """Start the child (if not running) and wait until it has loaded the functions."""
        if self._proc is not None and self._proc.is_alive():
            return
        self._kill()
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe beside vLLM's threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_process_main, args=(child, self._payload, os.getpid()), name=f"reward-{self._index}", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn, self.pid = proc, parent, proc.pid
        if not parent.poll(_PROCESS_START_TIMEOUT_S):
            self._kill()
            raise RuntimeError(f"reward process did not start within {_PROCESS_START_TIMEOUT_S:.0f}s")
        ok, error = parent.recv()
        if not ok:
            self._kill()
            raise RuntimeError(f"reward process could not load the reward functions: {error}")

    def run(self, fn_index: int, args: tuple, timeout: float) -> Any:
        self.start()
        self._conn.send((fn_index, args))
        if not self._conn.poll(timeout):
            self._kill()
            raise _Timeout()
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise TransientRewardError(f"reward process died (exit code {code})") from None
        if not ok:
            raise value
        return value

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self.pid = None, None, None

    def close(self) -> None:
        self._kill()


def _process_main(conn: Any, payload: bytes, parent_pid: int) -> None:
    """The reward child: load the functions, then answer calls until the pipe closes."""
    if hasattr(signal, "pthread_sigmask"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when to stop
    _die_with_parent(parent_pid)
    try:
        functions = pickle.loads(payload)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send((False, repr(e)))
        return
    conn.send((True, None))
    while True:
        try:
            fn_index, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = (True, _invoke(functions[fn_index], args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            result = (False, e)
        try:
            conn.send(result)
        except Exception:  # the exception does not pickle: send what it said
            conn.send((False, RuntimeError(repr(result[1]))))


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this child when the trainer dies, even while a reward is stuck."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(0)
