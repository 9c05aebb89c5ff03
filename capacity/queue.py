"""The bounded queue of finished rollout groups, which is also the capacity.

A generation worker must hold a `Slot` (a permit) before it starts a group. The permits
start at `(max_staleness + 1) * groups_per_step`; a permit comes back either when the
worker gives up the group (`Slot.release`) or when the trainer has trained on the group
and the engines hold the new weights (`RolloutQueue.retire`). So generation can run at
most `max_staleness` policy versions ahead of training.

Permits alone bound how many groups exist, not how old a consumed group is: with groups
finishing out of order, a slow group could sit in flight while younger ones are trained
on, version after version. `get_batch` therefore picks batches earliest-deadline-first:
a group started at version v must be trained on at a version <= v + max_staleness, and
each batch takes just enough of the oldest groups (waiting for them if they are still in
flight) that every deadline can still be met; the rest of the batch is filled in
completion order. Because acquisitions at version v never exceed
`(v + max_staleness + 1) * groups_per_step`, such a schedule always exists, and the
staleness of every group handed out is <= max_staleness.

Pure Python threading; imports nothing else from the project.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time
from typing import Any, Callable, Deque

_allocate_lock = threading.Lock


class QueueClosed(RuntimeError):
    """The queue was closed; chained (`__cause__`) to the reason it was closed."""


class SlotError(RuntimeError):
    """A slot used against its rules: released twice, or put after release."""


class BatchTimeout(TimeoutError):
    """`get_batch` did not get its groups in time; the message carries the counters."""


class CapacityLeak(AssertionError):
    """The permit invariant does not hold, or permits are still held at the end."""


class ReleaseReason(str, enum.Enum):
    REJECTED = "rejected"  # the worker decided the group is not worth training on
    FAILED = "failed"  # generation or scoring raised
    CANCELLED = "cancelled"  # shutdown, or the slot was left without a result
    FILTERED = "filtered"  # e.g. a group whose rewards carry no signal


_HELD, _PUT, _RELEASED = "held", "put", "released"


class Slot:
    """A permit held by one worker for one group. Use it as a context manager:
    leaving the block without `put` or `release` releases it (failed on an exception,
    cancelled otherwise), so an exception never leaks a permit."""

    __slots__ = ("_queue", "version", "thread", "state")

    def __init__(self, queue: RolloutQueue, version: int, thread: str):
        self._queue = queue
        self.version = version  # policy version current when the slot was acquired
        self.thread = thread  # name of the thread that acquired it
        self.state = _HELD

    def put(self, group: Any) -> None:
        """Hand the finished group to the trainer; the permit travels with it."""
        self._queue._put(self, group)

    def release(self, reason: ReleaseReason | str) -> None:
        """Give the permit back without a group."""
        self._queue._release(self, ReleaseReason(reason))

    @property
    def held(self) -> bool:
        return self.state == _HELD

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.held:
            self._queue._release(
                self, ReleaseReason.FAILED if exc_type else ReleaseReason.CANCELLED
            )

    def __repr__(self) -> str:
        return f"Slot(version={self.version}, thread={self.thread!r}, state={self.state})"


class _Waiter:
    """One blocked call: a lock that is held until someone opens it to wake the caller."""

    __slots__ = ("lock",)

    def __init__(self):
        self.lock = _allocate_lock()
        self.lock.acquire()


@dataclasses.dataclass(frozen=True)
class Counters:
    """A consistent snapshot of the queue's state."""

    permits: int
    free: int
    acquired: int
    in_flight: int  # held by workers, no group yet
    queued: int  # finished groups waiting for the trainer
    consumed: int  # handed out by get_batch
    retired: int
    released: dict[str, int]  # by reason
    version: int
    staleness: dict[int, int]  # staleness -> number of groups handed out with it
    closed: bool

    @property
    def consumed_not_retired(self) -> int:
        return self.consumed - self.retired

    @property
    def max_staleness_seen(self) -> int:
        return max(self.staleness, default=0)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["consumed_not_retired"] = self.consumed_not_retired
        return d


class RolloutQueue:
    def __init__(self, max_staleness: int, groups_per_step: int, poll_s: float = 0.1, version: int = 0):
        """`version`: the policy version to start at (a resumed run's); slots acquired
        before the first `retire` are stamped with it."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.permits = (max_staleness + 1) * groups_per_step
        self.poll_s = poll_s

        self._lock = _allocate_lock()
        self._free = self.permits
        self._waiters: Deque[_Waiter] = collections.deque()
        self._queue: Deque[tuple[int, Any]] = collections.deque()  # (start version, group)
        # Groups not yet handed out (in flight or queued), by start version: what the
        # earliest-deadline-first choice in get_batch needs. At most max_staleness + 1 keys.
        self._pending_by_version: dict[int, int] = {}
        # The blocked get_batch, and which put can let it proceed: one that makes the
        # queue at least `_consumer_need` long and whose group started at a version
        # <= `_consumer_wake_version` (the oldest groups, when those are what it needs).
        self._consumer: _Waiter | None = None
        self._consumer_need = 0
        self._consumer_wake_version = 0

        self._version = version
        self._acquired = 0
        self._in_flight = 0
        self._consumed = 0
        self._retired = 0
        self._released = {r.value: 0 for r in ReleaseReason}
        self._staleness: dict[int, int] = {}
        self._closed = False
        self._close_cause: BaseException | None = None

    # ---- producers -------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Slot | None:
        """Take a permit; block up to `timeout` seconds (None: until one is free or the
        queue closes). Returns None on timeout, raises QueueClosed once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._raise_if_closed()
                if self._free > 0:
                    self._free -= 1
                    return self._grant()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                waiter = _Waiter()
                self._waiters.append(waiter)
            # Returning k permits wakes at most k waiters: only threads that can
            # proceed wake. A running thread may take the permit first (no handoff,
            # which would cost a thread switch per group); the loser waits again.
            if not waiter.lock.acquire(timeout=-1 if left is None else left):
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def _grant(self) -> Slot:
        # Caller holds the lock and has taken the permit off `free`.
        self._acquired += 1
        self._in_flight += 1
        v = self._version
        self._pending_by_version[v] = self._pending_by_version.get(v, 0) + 1
        return Slot(self, v, threading.current_thread().name)

    def _put(self, slot: Slot, group: Any) -> None:
        with self._lock:
            self._check_held(slot, "put")
            if self._closed:
                self._finish_slot(slot, ReleaseReason.CANCELLED)
                self._raise_if_closed()
            slot.state = _PUT
            self._in_flight -= 1
            self._queue.append((slot.version, group))
            consumer = self._consumer
            if (
                consumer is not None
                and len(self._queue) >= self._consumer_need
                and slot.version <= self._consumer_wake_version
            ):
                self._consumer = None
                consumer.lock.release()

    def _release(self, slot: Slot, reason: ReleaseReason) -> None:
        with self._lock:
            self._check_held(slot, "release")
            self._finish_slot(slot, reason)
            consumer = self._consumer
            if consumer is not None:
                # One group fewer to wait for may make a batch possible.
                self._consumer = None
                consumer.lock.release()

    def _finish_slot(self, slot: Slot, reason: ReleaseReason) -> None:
        slot.state = _RELEASED
        self._in_flight -= 1
        self._released[reason.value] += 1
        self._drop_pending(slot.version, 1)
        self._return_permits(1)

    def _check_held(self, slot: Slot, what: str) -> None:
        if slot._queue is not self:
            raise SlotError(f"{what}: {slot!r} belongs to another queue")
        if slot.state != _HELD:
            raise SlotError(f"{what} on a slot that is already {slot.state}: {slot!r}")

    # ---- consumer --------------------------------------------------------------

    def get_batch(
        self,
        n: int,
        timeout: float | None = None,
        health_check: Callable[[], None] | None = None,
        poll_s: float | None = None,
    ) -> list[Any]:
        """Return n finished groups, waiting in increments of at most `poll_s` and
        calling `health_check()` (which raises the first worker error) between them."""
        if n < 1 or n > self.permits:
            raise ValueError(f"n must be in [1, {self.permits}], got {n}")
        poll_s = self.poll_s if poll_s is None else poll_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._raise_if_closed()
                batch = self._take_batch(n)
                if batch is not None:
                    return batch
                waiter = _Waiter()
                self._consumer = waiter
            wait = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    with self._lock:
                        if self._consumer is waiter:
                            self._consumer = None
                    raise BatchTimeout(
                        f"waited {timeout:.1f}s for {n} groups; counters: {self.counters().as_dict()}"
                    )
                wait = min(wait, left)
            woken = waiter.lock.acquire(timeout=wait)
            if not woken:
                with self._lock:
                    if self._consumer is waiter:
                        self._consumer = None
            if health_check is not None:
                health_check()

    def _required_oldest(self, n: int) -> int:
        """How many of the oldest pending groups this batch must contain so that every
        pending group can still be trained on within max_staleness versions.

        Steps t .. t+j consume (j+1)*n groups, so the groups whose deadline
        (start version + max_staleness) is <= t+j must number at most (j+1)*n after this
        batch. Deadlines beyond t+max_staleness belong to groups not yet started."""
        required = 0
        for j in range(self.max_staleness + 1):
            last_version_due = self._version - self.max_staleness + j
            due = sum(k for v, k in self._pending_by_version.items() if v <= last_version_due)
            required = max(required, due - j * n)
        # More than n can only happen if the trainer consumed or retired out of step;
        # the bound is then lost, but the batch still has n groups.
        return min(required, n)

    def _take_batch(self, n: int) -> list[Any] | None:
        # Caller holds the lock. On failure, records what the consumer waits for.
        if len(self._queue) < n:
            self._consumer_need = n
            self._consumer_wake_version = self._version
            return None
        required = self._required_oldest(n)
        if required > 0:
            batch_items = self._take_with_oldest(n, required)
            if batch_items is None:
                return None
        else:
            batch_items = [self._queue.popleft() for _ in range(n)]
        for version, _ in batch_items:
            self._drop_pending(version, 1)
            s = self._version - version
            self._staleness[s] = self._staleness.get(s, 0) + 1
        self._consumed += n
        return [group for _, group in batch_items]

    def _take_with_oldest(self, n: int, required: int) -> list[tuple[int, Any]] | None:
        """Take the `required` oldest pending groups (None if some of them are still in
        flight), then fill up in completion order."""
        versions = sorted(self._pending_by_version)
        must: dict[int, int] = {}
        left = required
        for v in versions:
            k = min(left, self._pending_by_version[v])
            must[v] = k
            left -= k
            if left == 0:
                break
        queued_by_version: dict[int, int] = {}
        for v, _ in self._queue:
            queued_by_version[v] = queued_by_version.get(v, 0) + 1
        if any(queued_by_version.get(v, 0) < k for v, k in must.items()):
            self._consumer_need = n
            self._consumer_wake_version = max(must)
            return None
        chosen: list[tuple[int, Any]] = []
        rest: Deque[tuple[int, Any]] = collections.deque()
        for item in self._queue:
            if must.get(item[0], 0) > 0:
                must[item[0]] -= 1
                chosen.append(item)
            else:
                rest.append(item)
        while len(chosen) < n:
            chosen.append(rest.popleft())
        self._queue = rest
        return chosen

    def discard_queued(self, reason: ReleaseReason | str = ReleaseReason.CANCELLED) -> int:
        """Drop the finished groups nobody will train on (the end of a run) and return
        their permits. Allowed after close. Returns how many were dropped."""
        reason = ReleaseReason(reason)
        with self._lock:
            dropped, self._queue = self._queue, collections.deque()
            for version, _ in dropped:
                self._drop_pending(version, 1)
            self._released[reason.value] += len(dropped)
            self._return_permits(len(dropped))
            return len(dropped)

    def _drop_pending(self, version: int, k: int) -> None:
        left = self._pending_by_version[version] - k
        if left:
            self._pending_by_version[version] = left
        else:
            del self._pending_by_version[version]

    def retire(self, n: int) -> int:
        """The trainer has trained on n groups and the engines hold the new weights:
        advance the policy version, then return the n permits. Returns the new version.

        The version moves first so that a permit handed out here is already stamped
        with the new version."""
        with self._lock:
            self._raise_if_closed()
            if n < 0 or n > self._consumed - self._retired:
                raise ValueError(
                    f"retire({n}): only {self._consumed - self._retired} groups consumed and not retired"
                )
            self._version += 1
            self._retired += n
            self._return_permits(n)
            return self._version

    def _return_permits(self, k: int) -> None:
        # Caller holds the lock.
        self._free += k
        for _ in range(min(k, len(self._waiters))):
            self._waiters.popleft().lock.release()

    # ---- lifecycle and introspection -------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def batch_taken(self) -> bool:
        """Whether get_batch has handed out a batch yet (since this queue was made)."""
        return self._consumed > 0

    def close(self, cause: BaseException | None = None) -> None:
        """Wake every blocked acquire/get_batch; they and later calls raise QueueClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_cause = cause
            waiters, self._waiters = self._waiters, collections.deque()
            consumer, self._consumer = self._consumer, None
        for w in waiters:
            w.lock.release()
        if consumer is not None:
            consumer.lock.release()

    def _raise_if_closed(self) -> None:
        if self._closed:
            cause = self._close_cause
            msg = "rollout queue is closed" + (f": {cause!r}" if cause is not None else "")
            raise QueueClosed(msg) from cause

    def counters(self) -> Counters:
        with self._lock:
            return Counters(
                permits=self.permits,
                free=self._free,
                acquired=self._acquired,
                in_flight=self._in_flight,
                queued=len(self._queue),
                consumed=self._consumed,
                retired=self._retired,
                released=dict(self._released),
                version=self._version,
                staleness=dict(self._staleness),
                closed=self._closed,
            )

    def check(self) -> Counters:
        """Verify permits == free + in_flight + queued + consumed_not_retired."""
        c = self.counters()
        held = c.free + c.in_flight + c.queued + c.consumed_not_retired
        if held != c.permits or c.acquired != (
            c.in_flight + c.queued + c.consumed + sum(c.released.values())
        ):
            raise CapacityLeak(f"permit accounting broken: {c.as_dict()}")
        return c

    def assert_drained(self) -> Counters:
        """At the end of a run: nothing in flight, queued or unretired, every permit free."""
        c = self.check()
        if c.free != c.permits:
            raise CapacityLeak(f"permits still held at the end: {c.as_dict()}")
        return c
