"""No non-finite value reaches the optimizer, the engines or a checkpoint: a step whose
loss or gradient norm is NaN/inf is skipped and logged, and algo.max_nonfinite_steps
such steps in a row fail the run. The fake engine (tests/fake_engine.py) (the loss is injected
at a precise step); the trainer, queue, workers and checkpoints are real."""

import math

import pytest
import torch
from structlog.testing import capture_logs

import trainer.trainer as trainer_mod
from tests.helpers import LetterTask
from tests.trainer.test_resume import config
from trainer import Trainer
from trainer import checkpoint as ckpt
from trainer import metrics as M
from trainer.errors import NonFiniteSteps


def poison_loss(monkeypatch, bad_steps, trainer):
    """policy_loss returns NaN at the optimizer steps in `bad_steps`."""
    real = trainer_mod.policy_loss

    def loss(*args, **kwargs):
        value, stats = real(*args, **kwargs)
        if trainer.step in bad_steps:
            value = value * math.nan
        return value, stats

    monkeypatch.setattr(trainer_mod, "policy_loss", loss)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_nan_loss_skips_the_step_and_training_goes_on(tmp_path, tiny_model_path, fake_engine, monkeypatch):
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=3"), task=LetterTask())
    poison_loss(monkeypatch, {1}, trainer)
    seen = {}
    train_on = trainer._train_on

    def recording(groups):
        before = weights(trainer.policy)
        stats = train_on(groups)
        after = weights(trainer.policy)
        seen[trainer.step] = any(not torch.equal(before[k], after[k]) for k in before)
        return stats

    trainer._train_on = recording
    with capture_logs() as logs:
        history = trainer.fit()
    assert seen == {0: True, 1: False, 2: True}  # the NaN step left the weights alone
    assert [h[M.LOSS_NONFINITE_SKIPPED] for h in history] == [0, 1, 0]
    assert history[1][M.LOSS_POLICY] is None  # null in JSON, not NaN
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    skipped = [e for e in logs if e["event"] == "step_skipped_nonfinite"]
    assert len(skipped) == 1 and skipped[0]["in_a_row"] == 1 and skipped[0]["loss"] == "nan"
    state = ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(tmp_path), trainer.policy, trainer.optimizer, trainer.device)
    assert state["trainer_state"]["step"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_max_nonfinite_steps_in_a_row_fail_the_run(tmp_path, tiny_model_path, fake_engine, monkeypatch):
    trainer = Trainer(
        config(tmp_path, tiny_model_path, "run.steps=6", "algo.max_nonfinite_steps=2"), task=LetterTask()
    )
    poison_loss(monkeypatch, {1, 3, 4, 5}, trainer)  # 1 alone is skipped; 3 and 4 in a row fail
    with pytest.raises(NonFiniteSteps, match="2 steps in a row had a non-finite loss"):
        trainer.fit()
    assert [h[M.LOSS_NONFINITE_SKIPPED] for h in trainer.history] == [0, 1, 0, 1]
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    trainer.queue.check()
