"""Unit tests for each rule of the rollout queue."""

import threading
import time

import pytest

from capacity import (
    BatchTimeout,
    CapacityLeak,
    QueueClosed,
    ReleaseReason,
    RolloutQueue,
    SlotError,
)


def fill(q, k, tag="g"):
    """Acquire k slots and put a group in each; returns the groups in put order."""
    groups = []
    for i in range(k):
        slot = q.acquire(timeout=0)
        assert slot is not None
        slot.put(f"{tag}{i}")
        groups.append(f"{tag}{i}")
    return groups


def test_permits_start_at_staleness_plus_one_times_groups_per_step():
    q = RolloutQueue(max_staleness=2, groups_per_step=3)
    assert q.permits == 9
    slots = [q.acquire(timeout=0) for _ in range(9)]
    assert all(s is not None for s in slots)
    assert q.acquire(timeout=0) is None
    c = q.check()
    assert (c.free, c.in_flight, c.acquired) == (0, 9, 9)


def test_acquire_blocks_until_timeout_and_returns_none():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    held = q.acquire()
    t0 = time.monotonic()
    assert q.acquire(timeout=0.2) is None
    assert 0.15 < time.monotonic() - t0 < 1.0
    held.release("cancelled")
    assert q.acquire(timeout=0.2) is not None


def test_slot_records_version_and_thread():
    q = RolloutQueue(max_staleness=1, groups_per_step=1)
    result = {}
    t = threading.Thread(target=lambda: result.update(slot=q.acquire()), name="gen-7")
    t.start()
    t.join()
    assert result["slot"].thread == "gen-7"
    assert result["slot"].version == 0
    result["slot"].put("x")
    assert q.get_batch(1) == ["x"]
    assert q.retire(1) == 1
    assert q.acquire().version == 1


def test_release_reasons_are_counted_and_return_the_permit():
    q = RolloutQueue(max_staleness=0, groups_per_step=4)
    for reason in ("rejected", "failed", ReleaseReason.CANCELLED, "filtered"):
        q.acquire().release(reason)
    c = q.check()
    assert c.released == {"rejected": 1, "failed": 1, "cancelled": 1, "filtered": 1}
    assert c.free == 4 and c.in_flight == 0
    with pytest.raises(ValueError):
        q.acquire().release("bored")


def test_context_manager_releases_on_exception_and_on_plain_exit():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    with pytest.raises(KeyError):
        with q.acquire():
            raise KeyError("boom")
    with q.acquire():
        pass
    with q.acquire() as slot:
        slot.put("kept")
    c = q.check()
    assert c.released["failed"] == 1
    assert c.released["cancelled"] == 1
    assert c.queued == 1 and c.free == 1


def test_second_release_and_put_after_release_raise():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    slot = q.acquire()
    slot.release("rejected")
    with pytest.raises(SlotError, match="already released"):
        slot.release("rejected")
    with pytest.raises(SlotError, match="already released"):
        slot.put("g")
    slot2 = q.acquire()
    slot2.put("g")
    with pytest.raises(SlotError, match="already put"):
        slot2.put("g")
    assert q.check().free == 0


def test_put_after_close_raises_and_keeps_the_books_balanced():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    slot = q.acquire()
    q.close(RuntimeError("engine died"))
    with pytest.raises(QueueClosed) as info:
        slot.put("g")
    assert isinstance(info.value.__cause__, RuntimeError)
    c = q.check()
    assert c.released["cancelled"] == 1 and c.free == 1


def test_get_batch_returns_exactly_n_in_completion_order():
    q = RolloutQueue(max_staleness=1, groups_per_step=3)
    slots = [q.acquire() for _ in range(5)]
    for i in (3, 0, 4, 1, 2):
        slots[i].put(f"g{i}")
    assert not q.batch_taken  # the workers' first-batch cap holds until here
    assert q.get_batch(3) == ["g3", "g0", "g4"]
    assert q.counters().queued == 2
    assert q.batch_taken


def test_get_batch_timeout_reports_counters_and_calls_health_check():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    fill(q, 1)
    calls = []
    t0 = time.monotonic()
    with pytest.raises(BatchTimeout, match=r"2 groups.*'queued': 1"):
        q.get_batch(2, timeout=0.35, health_check=lambda: calls.append(time.monotonic()))
    assert time.monotonic() - t0 < 1.0
    # Polls of at most 0.1 s: at least 3 health checks in 0.35 s.
    assert len(calls) >= 3
    assert q.counters().queued == 1  # a timed-out get_batch takes nothing


def test_health_check_error_surfaces_promptly():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    failed_at = time.monotonic() + 0.2

    def health_check():
        if time.monotonic() > failed_at:
            raise RuntimeError("worker gen-0 died")

    with pytest.raises(RuntimeError, match="gen-0"):
        q.get_batch(1, timeout=5, health_check=health_check)
    assert time.monotonic() - failed_at < 0.2


def test_get_batch_wakes_when_groups_arrive():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    slots = [q.acquire(), q.acquire()]

    def producer():
        time.sleep(0.05)
        slots[0].put("a")
        slots[1].put("b")

    threading.Thread(target=producer).start()
    t0 = time.monotonic()
    assert q.get_batch(2, timeout=5, poll_s=10) == ["a", "b"]
    assert time.monotonic() - t0 < 1.0


def test_retire_returns_permits_advances_version_and_rejects_overretire():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    fill(q, 2)
    assert q.acquire(timeout=0) is None
    with pytest.raises(ValueError, match="only 0 groups consumed"):
        q.retire(1)
    q.get_batch(2)
    assert q.acquire(timeout=0) is None  # consumed is not retired: still no permit
    assert q.retire(2) == 1
    assert q.version == 1
    with pytest.raises(ValueError, match="only 0"):
        q.retire(1)
    assert q.acquire(timeout=0).version == 1


def test_retire_hands_permits_to_blocked_acquirers_with_the_new_version():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    fill(q, 1)
    got = []
    t = threading.Thread(target=lambda: got.append(q.acquire(timeout=5)))
    t.start()
    time.sleep(0.05)
    q.get_batch(1)
    q.retire(1)
    t.join(2)
    assert got[0].version == 1


def test_close_wakes_blocked_acquire_and_get_batch_within_half_a_second():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    q.acquire(), q.acquire()
    errors = {}

    def blocked(name, fn):
        try:
            fn()
        except QueueClosed as e:
            errors[name] = (time.monotonic(), e)

    threads = [
        threading.Thread(target=blocked, args=(f"acq{i}", lambda: q.acquire())) for i in range(4)
    ]
    threads.append(
        threading.Thread(target=blocked, args=("get", lambda: q.get_batch(2, poll_s=30)))
    )
    for t in threads:
        t.start()
    time.sleep(0.1)
    cause = RuntimeError("EngineDeadError on engine 0")
    closed_at = time.monotonic()
    q.close(cause)
    for t in threads:
        t.join(1)
    assert sorted(errors) == ["acq0", "acq1", "acq2", "acq3", "get"]
    for woke_at, err in errors.values():
        assert woke_at - closed_at < 0.5
        assert err.__cause__ is cause
    for later in (lambda: q.acquire(timeout=0), lambda: q.get_batch(1), lambda: q.retire(0)):
        with pytest.raises(QueueClosed) as info:
            later()
        assert info.value.__cause__ is cause


def test_check_detects_a_broken_invariant():
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    q.acquire()
    q._free += 1  # simulate a leak in the bookkeeping
    with pytest.raises(CapacityLeak, match="permit accounting"):
        q.check()


def test_assert_drained_fails_while_anything_is_held():
    q = RolloutQueue(max_staleness=0, groups_per_step=1)
    slot = q.acquire()
    with pytest.raises(CapacityLeak, match="still held"):
        q.assert_drained()
    slot.put("g")
    with pytest.raises(CapacityLeak):
        q.assert_drained()
    q.get_batch(1)
    with pytest.raises(CapacityLeak):
        q.assert_drained()
    q.retire(1)
    c = q.assert_drained()
    assert c.consumed == c.retired == 1


def test_max_staleness_zero_is_synchronous():
    """Generation for step t+1 cannot start before step t's weights are retired."""
    q = RolloutQueue(max_staleness=0, groups_per_step=2)
    fill(q, 2)
    batch = q.get_batch(2)
    assert len(batch) == 2
    assert q.acquire(timeout=0.05) is None  # training on step 0: no new generation
    q.retire(2)
    assert q.acquire(timeout=0).version == 1
    assert q.counters().staleness == {0: 2}


def test_a_slow_group_is_trained_on_before_it_becomes_too_stale():
    """Out-of-order completion: a group started at version 0 that never finishes
    first must still be in a batch by version max_staleness."""
    k, n = 1, 1
    q = RolloutQueue(max_staleness=k, groups_per_step=n)
    slow = q.acquire()  # version 0, finishes late
    fast = q.acquire()
    fast.put("fast0")
    assert q.get_batch(1) == ["fast0"]  # nothing forces the slow one yet
    q.retire(1)  # version 1: the slow group's deadline is now
    q.acquire().put("fast1")
    with pytest.raises(BatchTimeout):
        q.get_batch(1, timeout=0.2)  # must wait for the slow group, not take fast1
    slow.put("slow0")
    assert q.get_batch(1) == ["slow0"]
    assert q.counters().max_staleness_seen == 1


def test_oldest_first_keeps_every_deadline_feasible():
    """k=2, n=1: three groups started at version 0. Taking a younger group at
    version 1 would leave two groups due at version 2 for one batch: get_batch must
    take an old one at version 1 already."""
    q = RolloutQueue(max_staleness=2, groups_per_step=1)
    old = [q.acquire() for _ in range(3)]
    old[0].put("a")
    assert q.get_batch(1) == ["a"]
    q.retire(1)
    q.acquire().put("young")
    old[1].put("b")
    assert q.get_batch(1) == ["b"]  # "young" finished first, but "b" is due sooner
    q.retire(1)
    old[2].put("c")
    assert q.get_batch(1) == ["c"]
    q.retire(1)
    assert q.get_batch(1) == ["young"]
    assert q.counters().max_staleness_seen == 2


def test_discard_queued_returns_permits_after_close():
    q = RolloutQueue(max_staleness=1, groups_per_step=2)
    fill(q, 3)
    q.get_batch(2)
    q.retire(2)
    q.close()
    assert q.discard_queued() == 1
    c = q.assert_drained()
    assert c.released["cancelled"] == 1 and c.consumed == 2


def test_a_resumed_queue_starts_at_its_version_and_keeps_the_staleness_bound():
    """A resumed run starts the queue at the checkpoint's policy version: slots are
    stamped with it, retire moves on from it, and the earliest-deadline-first rule works
    on versions relative to it (the slow-group case above, shifted by 7)."""
    q = RolloutQueue(max_staleness=1, groups_per_step=1, version=7)
    assert q.version == 7 and q.counters().version == 7
    slow = q.acquire()
    assert slow.version == 7
    q.acquire().put("fast7")
    assert q.get_batch(1) == ["fast7"]
    assert q.retire(1) == 8
    fresh = q.acquire()
    assert fresh.version == 8
    fresh.put("fast8")
    with pytest.raises(BatchTimeout):
        q.get_batch(1, timeout=0.2)  # the slow group from version 7 is due now
    slow.put("slow7")
    assert q.get_batch(1) == ["slow7"]
    assert q.counters().staleness == {0: 1, 1: 1}
    q.retire(1)
    assert q.get_batch(1) == ["fast8"]
    q.retire(1)
    assert q.assert_drained().version == 10
    with pytest.raises(ValueError, match="version must be >= 0"):
        RolloutQueue(max_staleness=0, groups_per_step=1, version=-1)
