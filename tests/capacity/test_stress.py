"""Many producers, random outcomes, one consumer that retires: nothing leaks and the
staleness bound holds for every group."""

import random
import threading

import pytest

from capacity import QueueClosed, RolloutQueue


class Flaky(Exception):
    pass


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_sixteen_producers_random_paths_drain_and_respect_staleness(max_staleness):
    groups_per_step, steps, producers = 4, 150, 16
    q = RolloutQueue(max_staleness=max_staleness, groups_per_step=groups_per_step)
    stop = threading.Event()
    producer_errors = []

    def producer(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                slot = q.acquire(timeout=0.05)
                if slot is None:
                    continue
                try:
                    with slot:
                        if rng.random() < 0.3:
                            # Some groups take longer than others: out-of-order finish.
                            stop.wait(rng.random() * 0.002)
                        r = rng.random()
                        if r < 0.1:
                            raise Flaky()
                        if r < 0.15:
                            slot.release("rejected")
                        elif r < 0.2:
                            slot.release("filtered")
                        elif r < 0.22:
                            pass  # left without a result: cancelled
                        else:
                            slot.put({"version": slot.version})
                except Flaky:
                    pass
        except QueueClosed:
            pass
        except BaseException as e:  # pragma: no cover - reported below
            producer_errors.append(e)

    threads = [
        threading.Thread(target=producer, args=(i,), name=f"gen-{i}", daemon=True)
        for i in range(producers)
    ]
    for t in threads:
        t.start()

    staleness_seen = []
    for step in range(steps):
        batch = q.get_batch(groups_per_step, timeout=30)
        assert len(batch) == groups_per_step
        staleness_seen += [q.version - g["version"] for g in batch]
        q.check()
        assert q.retire(groups_per_step) == step + 1

    stop.set()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert not producer_errors

    # Drain: what is still queued was never trained on; hand it back.
    leftovers = q.counters().queued
    while q.counters().queued >= groups_per_step:
        q.get_batch(groups_per_step)
        q.retire(groups_per_step)
    c = q.counters()
    if c.queued:
        q.get_batch(c.queued)
        q.retire(c.queued)
    c = q.assert_drained()
    assert leftovers >= 0
    assert max(staleness_seen) <= max_staleness
    assert c.max_staleness_seen <= max_staleness
    assert c.released["failed"] > 0 and c.released["rejected"] > 0
    assert c.released["cancelled"] > 0 and c.released["filtered"] > 0
    assert sum(c.staleness.values()) == c.consumed
