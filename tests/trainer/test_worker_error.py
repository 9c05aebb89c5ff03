"""A worker's error ends fit() with that error, wherever the main thread is when it comes:
waiting for a batch, or after the weight sync (then retire() finds the queue closed).
The fake engine (tests/fake_engine.py) lets the error land at that precise point; the
trainer, queue, workers and reward checks are real."""

import math
import threading
import time

import pytest

from tests.helpers import LetterTask
from tests.trainer.test_resume import config
from trainer import Trainer
from workers.rewards import RewardInvalid


class NanFromPrompt2(LetterTask):
    """Rewards prompts 0 and 1 (step 0's batch) like LetterTask; the reward of any later
    prompt waits for `release`, then returns NaN."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def reward(self, text, prompt):
        if prompt.index < 2:
            return super().reward(text, prompt)
        self.release.wait(60)
        return math.nan


def test_a_worker_error_after_the_weight_sync_fails_fit_with_that_error(tmp_path, tiny_model_path, fake_engine):
    task = NanFromPrompt2()
    # max_staleness 1: the workers generate the next batch while a step trains and syncs.
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=3", "algo.max_staleness=1"), task=task)
    sync_weights = trainer._sync_weights
    landed = []

    def sync_then_a_worker_fails(version):
        seconds = sync_weights(version)
        task.release.set()
        deadline = time.monotonic() + 30
        # The supervisor records the error, logs it, then closes the queue: wait for the
        # close, which is what retire() meets.
        while not trainer.queue.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        landed.append(trainer.queue.closed and trainer.supervisor.failed_worker is not None)
        return seconds

    trainer._sync_weights = sync_then_a_worker_fails
    with pytest.raises(RewardInvalid, match=r"returned nan \(float\)"):
        trainer.fit()
    assert landed == [True]  # the error came after step 0's sync, before its retire()
    assert trainer.step == 0  # no step was counted
