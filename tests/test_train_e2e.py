"""End to end: real training steps with the tiny model and real vLLM engines on CPU."""

import pytest
import torch

from trainer import Trainer, TrainerConfig
from trainer import metrics as M
from tests.helpers import LetterTask, alive, run_threads
from trainer.models import load_policy

pytestmark = pytest.mark.engine


def tiny_config(tmp_path, model_path, *overrides):
    return TrainerConfig.load(
        None,
        [
            f"model.path={model_path}",
            f"run.output_dir={tmp_path / 'run'}",
            "algo.group_size=4",
            "algo.groups_per_step=2",
            "algo.lr=1e-2",  # large, so one step visibly changes the policy
            "gen.max_tokens=12",
            "engine.max_model_len=128",
            "engine.max_num_seqs=16",
            "engine.dtype=float32",  # exact log-prob agreement with the float32 policy
            *overrides,
        ],
    )


def fit_recording_engine_pids(trainer):
    """trainer.fit(), and the engine processes' PIDs as training starts."""
    pids = []
    train = trainer.train

    def train_and_record():
        pids.extend(pid for w in trainer.supervisor.workers for pid in w.engine.process_pids())
        return train()

    trainer.train = train_and_record
    return trainer.fit(), pids


def test_three_steps_train_sync_and_drain(tmp_path, tiny_model_path):
    cfg = tiny_config(tmp_path, tiny_model_path, "run.steps=3", "algo.max_staleness=0")
    trainer = Trainer(cfg, task=LetterTask())
    history, pids = fit_recording_engine_pids(trainer)

    assert [h[M.STEP] for h in history] == [0, 1, 2]
    assert [h[M.POLICY_VERSION] for h in history] == [1, 2, 3]
    # The policy moved away from the initial weights.
    initial, _ = load_policy(tiny_model_path)
    changed = [
        name
        for (name, p0), (_, p1) in zip(initial.named_parameters(), trainer.policy.named_parameters())
        if not torch.equal(p0, p1)
    ]
    assert len(changed) > 0
    # Synchronous (max_staleness=0): every group was sampled entirely by the weights the
    # trainer held at that step, so the engine's log-probs match the trainer's. At steps
    # 1 and 2 that holds only if the engine received the trained weights.
    for h in history:
        assert h[M.STALENESS_MAX] == 0
        assert h[M.SYNC_LOGPROB_MAX_DIFF] < 1e-3, h
    # ...and training moved the log-probs by far more than that tolerance.
    seq = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        before = torch.log_softmax(initial(input_ids=seq).logits, -1)
        after = torch.log_softmax(trainer.policy(input_ids=seq).logits, -1)
    assert (before - after).abs().max().item() > 1e-1
    assert history[-1][M.LOSS_GRAD_NORM] > 0
    c = trainer.final_counters
    assert c.consumed == c.retired == 6 and c.free == c.permits
    assert run_threads() == []
    assert pids and len(pids) >= 1
    assert alive(pids) == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_two_engines_both_generate_and_get_every_version(tmp_path, tiny_model_path):
    cfg = tiny_config(tmp_path, tiny_model_path, "run.steps=2", "engine.count=2", "algo.max_staleness=1")
    trainer = Trainer(cfg, task=LetterTask())
    history, pids = fit_recording_engine_pids(trainer)

    assert [h[M.POLICY_VERSION] for h in history] == [1, 2]
    workers = trainer.supervisor.workers
    assert [w.name for w in workers] == ["gen-0", "gen-1"]
    for w in workers:
        assert w.stats["groups"] > 0, w.stats
        assert w.stats["weight_loads"] == 2
        assert w.weight_version == 2
    for h in history:
        assert h[M.STALENESS_MAX] <= 1
    assert trainer.final_counters.free == trainer.final_counters.permits
    assert run_threads() == []
    assert len(set(pids)) >= 2
    assert alive(pids) == []
