"""The generation worker against the real engine (the session's tiny float32 one)."""

from __future__ import annotations

import time

import pytest

from capacity import RolloutQueue
from workers.rewards import RewardFunction, RewardPool, RewardSpec
from workers.supervisor import Supervisor
from workers.worker import GenerationWorker, PromptItem, SamplingSpec

pytestmark = [pytest.mark.engine, pytest.mark.timeout(240)]


class Prompts:
    def __init__(self):
        self.i = 0

    def next(self):
        self.i += 1
        return PromptItem(self.i, [1, 9690, 198, 2683, 359, 253, 5356], None)


class Watched:
    """The shared engine, watched: the most groups in flight at once (submitted and not
    yet handed back to the worker) before the queue handed out its first batch, and after.
    After the first batch it holds back finished groups until 4 are in flight (or for
    HOLD_S), so that a group reaching EOS early cannot hide what the worker's limit allows.
    Its shutdown only aborts what is left (the session's other tests use the engine after
    this one)."""

    HOLD_S = 10.0

    def __init__(self, engine, queue: RolloutQueue):
        self._engine, self._queue = engine, queue
        self.most_before_first_batch = self.most_after = 0
        self._in_flight: set[str] = set()
        self._held: list = []
        self._hold_until: float | None = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, request_id, *args, **kwargs):
        self._engine.submit(request_id, *args, **kwargs)
        self._in_flight.add(request_id)
        if not self._queue.batch_taken:
            self.most_before_first_batch = max(self.most_before_first_batch, len(self._in_flight))
        else:
            self.most_after = max(self.most_after, len(self._in_flight))

    def step(self):
        finished = self._held + self._engine.step()
        self._held = []
        if self._queue.batch_taken:
            if self._hold_until is None:
                self._hold_until = time.monotonic() + self.HOLD_S
            if self.most_after < 4 and time.monotonic() < self._hold_until:
                self._held, finished = finished, []
        for f in finished:
            self._in_flight.discard(f.request_id)
        return finished

    def shutdown(self, timeout: float = 10.0) -> None:
        self._engine.abort(list(self._engine._pending))


def test_until_the_first_batch_an_engine_generates_only_its_share_of_it(tiny_engine):
    queue = RolloutQueue(max_staleness=2, groups_per_step=2)  # 6 permits, all free at the start
    rewards = RewardPool(RewardSpec([RewardFunction("one", lambda t, p: 1.0)], workers=1)).start()
    watched = Watched(tiny_engine, queue)

    def make_worker(i, on_error, start_gate):
        return GenerationWorker(
            i, build_engine=lambda: watched, queue=queue, prompts=Prompts(),
            sampling=SamplingSpec(group_size=2, max_tokens=64), rewards=rewards,
            max_groups_in_flight=6, first_batch_share=2, on_error=on_error, start_gate=start_gate,
        )

    sup = Supervisor(queue, make_worker, count=1)
    try:
        sup.start()
        sup.wait_ready(60)
        batch = queue.get_batch(2, timeout=60, health_check=sup.check)
        assert len(batch) == 2
        assert watched.most_before_first_batch == 2
        # Then the cap is gone: the 4 permits left go to groups in flight at once (the two
        # started after the first two finished, held back by Watched, and two more).
        deadline = time.monotonic() + 60
        while queue.counters().free:
            sup.check()
            assert time.monotonic() < deadline, queue.counters()
            time.sleep(0.01)
        assert watched.most_after == 4
    finally:
        sup.shutdown(10)
        rewards.shutdown()
    assert tiny_engine.num_unfinished() == 0
