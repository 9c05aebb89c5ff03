"""Library use: Trainer.fit() raises in the caller, leaves nothing running, runs again.
Real engines and the tiny model; faults from a signal, a loss, a reward function."""

import collections
import os
import signal
import threading
import time

import pytest
from structlog.testing import capture_logs

from trainer import Trainer, TrainerConfig
from tests.helpers import LetterTask, alive, run_threads
from workers.engine import EngineDeadError
from workers.rewards import RewardFailed, TransientRewardError

pytestmark = pytest.mark.engine


def config(tmp_path, model_path, *overrides):
    return TrainerConfig.load(
        None,
        [
            f"model.path={model_path}", f"run.output_dir={tmp_path / 'run'}", "algo.group_size=4",
            "algo.groups_per_step=2", "gen.max_tokens=16", "engine.max_model_len=256",
            "engine.max_num_seqs=16", *overrides,
        ],
    )


def assert_gone(pids):
    assert alive(pids) == []


def engine_pids_when_training(trainer, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup = trainer.supervisor
        if sup is not None and trainer.history and sup.workers[0].engine is not None:
            return sup.workers[0].engine.process_pids()
        time.sleep(0.05)
    raise AssertionError("training did not start")


def test_engine_death_raises_in_fit_then_fit_runs_again(tmp_path, tiny_model_path):
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=200"), task=LetterTask())
    pids = []

    def kill_engine_core():
        pids.extend(engine_pids_when_training(trainer))
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_engine_core, daemon=True)
    killer.start()
    with pytest.raises(EngineDeadError) as info:
        trainer.fit()
    killer.join(5)
    assert any("worker gen-0 (engine 0)" in note for note in info.value.__notes__)
    assert run_threads() == []
    assert_gone(pids)
    trainer.queue.check()

    again = Trainer(config(tmp_path, tiny_model_path, "run.steps=1"), task=LetterTask())
    assert len(again.fit()) == 1
    assert run_threads() == []


def test_exception_in_the_main_thread_stops_workers_and_engines(tmp_path, tiny_model_path):
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=5"), task=LetterTask())
    real_train_on = trainer._train_on
    pids = []

    def failing_train_on(groups):
        if trainer.history:  # the second step
            pids.extend(trainer.supervisor.workers[0].engine.process_pids())
            raise ZeroDivisionError("injected in the loss")
        return real_train_on(groups)

    trainer._train_on = failing_train_on
    with pytest.raises(ZeroDivisionError, match="injected"):
        trainer.fit()
    assert len(trainer.history) == 1
    assert run_threads() == []
    assert_gone(pids)
    c = trainer.queue.check()  # balanced: the failed step's batch is consumed, not retired
    assert c.consumed - c.retired == 2 and c.in_flight == 0 and c.queued == 0


def test_transient_reward_errors_are_retried_and_a_reward_failing_for_good_is_skipped(tmp_path, tiny_model_path):
    counts = collections.Counter()

    def fail(index, call):
        counts[index] += 1
        # Prompt 1: its first two calls fail, the third succeeds. Prompts 0, 3, ...: always.
        return index % 3 == 0 or (index == 1 and counts[index] <= 2)

    # One reward thread: calls run one at a time, so the failures hit one completion each.
    trainer = Trainer(
        config(tmp_path, tiny_model_path, "run.steps=2", "reward.workers=1", "reward.on_error=skip"),
        task=LetterTask(fail=fail),
    )
    with capture_logs() as logs:
        history = trainer.fit()
    assert len(history) == 2
    retries = [e for e in logs if e["event"] == "reward_retry"]
    assert [e["attempt"] for e in retries if e["prompt_index"] == 1] == [1, 2]
    assert all("verifier busy" in e["error"] and e["wait_s"] > 0 for e in retries)
    skipped = sum(w.stats["skipped"] for w in trainer.supervisor.workers)
    assert skipped >= 1
    assert {e["prompt_index"] % 3 for e in retries if e["prompt_index"] != 1} == {0}
    c = trainer.final_counters  # assert_drained passed inside fit
    assert c.released["failed"] == skipped


def test_reward_failing_for_good_fail_raises(tmp_path, tiny_model_path):
    task = LetterTask(fail=lambda index, call: index == 1)
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=3"), task=task)
    with pytest.raises(RewardFailed, match="prompt 1") as info:
        trainer.fit()
    assert isinstance(info.value.__cause__, TransientRewardError)
    assert run_threads() == []
    trainer.queue.check()
