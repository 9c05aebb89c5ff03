"""Supervisor paths that need a fault at a precise point: the fake engine blocks
exactly where vLLM does (the real-engine versions are in tests/test_faults.py)."""

import threading
import time

import pytest

from capacity import QueueClosed, RolloutQueue
from tests.fake_engine import FakeEngine
from workers.rewards import RewardFunction, RewardPool, RewardSpec
from workers.supervisor import EngineHung, EngineStartTimeout, Supervisor, WeightSyncTimeout
from workers.worker import GenerationWorker, PromptItem, SamplingSpec


class Prompts:
    def __init__(self):
        self.i = 0

    def next(self):
        self.i += 1
        return PromptItem(self.i, [1, 2], None)


POOLS: list[RewardPool] = []


@pytest.fixture(autouse=True)
def shut_reward_pools_down():
    yield
    while POOLS:
        POOLS.pop().shutdown()


def supervisor(build_engine, hang_timeout_s=60.0, permits_per_step=2):
    queue = RolloutQueue(max_staleness=0, groups_per_step=permits_per_step)
    rewards = RewardPool(RewardSpec([RewardFunction("one", lambda t, p: 1.0)], workers=1)).start()
    POOLS.append(rewards)

    def make_worker(i, on_error, start_gate):
        return GenerationWorker(
            i, build_engine=build_engine, queue=queue, prompts=Prompts(),
            sampling=SamplingSpec(group_size=2, max_tokens=4), rewards=rewards,
            max_groups_in_flight=2, on_error=on_error, start_gate=start_gate,
        )

    return Supervisor(queue, make_worker, count=1, hang_timeout_s=hang_timeout_s)


def test_a_step_that_never_returns_is_a_hang_with_stacks_logged():
    from structlog.testing import capture_logs

    engine = FakeEngine(block_step=True)
    sup = supervisor(lambda: engine, hang_timeout_s=0.3)
    sup.start()
    sup.wait_ready(5)
    t0 = time.monotonic()
    with capture_logs() as logs:
        with pytest.raises(EngineHung, match="no progress") as info:
            sup.queue.get_batch(2, timeout=10, health_check=sup.check)
    assert time.monotonic() - t0 < 2.0
    assert "raised in worker gen-0 (engine 0)" in info.value.__notes__
    assert engine.woken.is_set()  # the blocked thread was freed
    stacks = [e for e in logs if e["event"] == "thread_stack"]
    assert "gen-0" in {e["thread_name"] for e in stacks}
    assert sup.shutdown(5) == []
    assert engine.closed
    sup.queue.check()


def test_weight_sync_that_never_finishes_times_out():
    engine = FakeEngine(block_load=True)
    sup = supervisor(lambda: engine)
    sup.start()
    sup.wait_ready(5)
    with pytest.raises(WeightSyncTimeout, match="gen-0 did not load weights v1"):
        sup.broadcast_weights(b"", version=1, timeout=0.3)
    sup.workers[0].engine.wake_blocked()
    sup.shutdown(5)


def test_engine_that_never_starts_times_out_and_refuses_new_work():
    never = threading.Event()
    sup = supervisor(lambda: never.wait() and FakeEngine())
    sup.start()
    with pytest.raises(EngineStartTimeout, match="gen-0"):
        sup.wait_ready(0.3)
    never.set()
    assert sup.shutdown(5) == []
    with pytest.raises(QueueClosed):
        sup.queue.acquire(timeout=0)


def test_first_worker_error_is_reraised_and_closes_the_queue():
    def broken_engine():
        raise OSError("no such device")

    sup = supervisor(broken_engine)
    sup.start()
    with pytest.raises(OSError, match="no such device") as info:
        sup.wait_ready(5)
    assert "raised in worker gen-0 (engine 0)" in info.value.__notes__
    assert sup.failed_worker.name == "gen-0"
    with pytest.raises(QueueClosed) as closed:
        sup.queue.acquire(timeout=0)
    assert isinstance(closed.value.__cause__, OSError)
    sup.shutdown(5)
