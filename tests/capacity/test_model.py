"""Property-based: random operation sequences against a simple model of the counters."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from capacity import QueueClosed, RolloutQueue, SlotError


class QueueModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.k, self.n = 1, 2
        self.q = RolloutQueue(max_staleness=self.k, groups_per_step=self.n)
        self.held = []  # slots held by "workers"
        self.queued = 0
        self.consumed_not_retired = 0
        self.released = 0
        self.acquired = 0
        self.version = 0
        self.closed = False
        self.dead_slots = []  # released or put: any further use must raise

    def free(self):
        return self.q.permits - len(self.held) - self.queued - self.consumed_not_retired

    @rule()
    def acquire(self):
        if self.closed:
            try:
                self.q.acquire(timeout=0)
                raise AssertionError("acquire after close must raise")
            except QueueClosed:
                return
        slot = self.q.acquire(timeout=0)
        if self.free() > 0:
            assert slot is not None and slot.version == self.version
            self.held.append(slot)
            self.acquired += 1
        else:
            assert slot is None

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), outcome=st.sampled_from(["put", "rejected", "failed", "exit"]))
    def finish(self, i, outcome):
        slot = self.held.pop(i % len(self.held))
        if outcome == "put":
            if self.closed:
                try:
                    slot.put("g")
                    raise AssertionError("put after close must raise")
                except QueueClosed:
                    self.released += 1
            else:
                slot.put("g")
                self.queued += 1
        elif outcome == "exit":
            with slot:
                pass
            self.released += 1
        else:
            slot.release(outcome)
            self.released += 1
        self.dead_slots.append(slot)

    @precondition(lambda self: self.dead_slots)
    @rule(i=st.integers(0, 100))
    def reuse_dead_slot(self, i):
        slot = self.dead_slots[i % len(self.dead_slots)]
        for use in (lambda: slot.release("failed"), lambda: slot.put("g")):
            try:
                use()
                raise AssertionError("a finished slot must not be usable")
            except SlotError:
                pass

    @precondition(lambda self: not self.closed)
    @rule()
    def get_batch(self):
        try:
            batch = self.q.get_batch(self.n, timeout=0)
        except TimeoutError:
            batch = None
        if batch is not None:
            assert len(batch) == self.n
            self.queued -= self.n
            self.consumed_not_retired += self.n

    @precondition(lambda self: not self.closed)
    @rule(batches=st.integers(1, 2))
    def retire(self, batches):
        # The trainer's protocol: retire whole batches. Over-retiring must raise.
        k = batches * self.n
        try:
            v = self.q.retire(k)
        except ValueError:
            assert k > self.consumed_not_retired
            return
        assert k <= self.consumed_not_retired
        self.consumed_not_retired -= k
        self.version += 1
        assert v == self.version

    @rule()
    def close(self):
        self.q.close(RuntimeError("stop"))
        self.closed = True

    @invariant()
    def counters_match_the_model(self):
        c = self.q.check()
        assert c.in_flight == len(self.held)
        assert c.queued == self.queued
        assert c.consumed_not_retired == self.consumed_not_retired
        assert c.free == self.free()
        assert c.acquired == self.acquired
        assert sum(c.released.values()) == self.released
        assert c.version == self.version
        assert c.max_staleness_seen <= self.k


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
