"""Evaluation (trainer/eval.py): the metrics against hand-computed values, the trainer's
schedule and records, run.keep_best, and an engine that dies mid-evaluation. The fake
engine (tests/fake_engine.py) makes the completions known: sample i of a prompt is
"e" * i + "x" * (3 - i) with i + 1 tokens, so LetterTask scores it i / 3 (sample 3:
"eee", 1.0). The real-engine evaluation is in tests/test_train_e2e.py and
tests/test_faults.py."""

import json
import threading
import time

import pytest
from structlog.testing import capture_logs

from capacity import RolloutQueue
from tests.fake_engine import FakeEngine
from tests.helpers import LetterTask
from tests.trainer.test_resume import config
from trainer import Trainer
from trainer import checkpoint as ckpt
from trainer import metrics as M
from trainer.config import TrainerConfig
from trainer.errors import ConfigError
from trainer.eval import Evaluator, eval_metrics, pass_at_k
from trainer.plots import read_metrics
from trainer.tasks import Prompt
from workers.rewards import RewardFunction, RewardPool, RewardSpec
from workers.supervisor import Supervisor
from workers.worker import EvalResult, GenerationWorker, PromptItem, SamplingSpec


def test_pass_at_k_is_chen_et_al_unbiased_estimator():
    # 1 - C(n-c, k) / C(n, k), by hand.
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)=1, C(5,3)=10
    assert pass_at_k(5, 2, 4) == 1.0  # 3 wrong cannot fill 4 draws
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # C(7,2)=21, C(10,2)=45
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_eval_metrics_by_hand():
    results = [
        EvalResult(rewards=[1.0, 0.0, 0.0, 1.0], lengths=[2, 4, 6, 8], texts=[""] * 4),
        EvalResult(rewards=[0.5, 0.5, 0.0, 0.0], lengths=[1, 1, 1, 1], texts=[""] * 4),
        EvalResult(rewards=[1.0, 1.0, 1.0, 0.5], lengths=[3, 3, 3, 3], texts=[""] * 4),
    ]
    m = eval_metrics(results, k=4, pass_threshold=1.0)
    # passes per prompt: 2, 0, 3 of 4
    assert m[M.EVAL_PASS_AT_1] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert m[M.EVAL_PASS_AT_K] == pytest.approx((1 + 0 + 1) / 3)
    assert m[M.EVAL_MEAN_AT_K] == pytest.approx((0.5 + 0.25 + 0.875) / 3)
    assert m[M.EVAL_REWARD_MEAN] == pytest.approx(6.5 / 12)
    assert m[M.EVAL_COMPLETION_LEN] == pytest.approx((20 + 4 + 12) / 12)
    assert m[M.EVAL_K] == 4 and m[M.EVAL_PROMPTS] == 3
    # A lower threshold counts the half-right answers as passes.
    assert eval_metrics(results, k=2, pass_threshold=0.5)[M.EVAL_PASS_AT_1] == pytest.approx((2 / 4 + 2 / 4 + 1) / 3)


# LetterTask on the fake engine, eval.samples=4: every prompt scores [0, 1/3, 2/3, 1]
# over completions of 1, 2, 3, 4 tokens; only the last passes at threshold 1.
FAKE_EVAL = {
    M.EVAL_PASS_AT_1: 0.25, M.EVAL_PASS_AT_K: 1.0, M.EVAL_MEAN_AT_K: 0.5, M.EVAL_REWARD_MEAN: 0.5,
    M.EVAL_COMPLETION_LEN: 2.5, M.EVAL_K: 4,
}


def test_evaluations_run_on_schedule_hold_no_permit_and_are_recorded(tmp_path, tiny_model_path, fake_engine):
    cfg = config(
        tmp_path, tiny_model_path, "run.steps=3", "eval.every=2", "eval.before_train=true",
        "eval.prompts=3", "eval.samples=4", "algo.max_staleness=1",
    )
    trainer = Trainer(cfg, task=LetterTask())
    with capture_logs() as logs:
        history = trainer.fit()
    assert len(history) == 3
    # Before the first step, every 2 steps, and after the last.
    assert [e[M.STEP] for e in trainer.evals] == [0, 2, 3]
    assert [e[M.POLICY_VERSION] for e in trainer.evals] == [0, 2, 3]
    for e in trainer.evals:
        assert {k: e[k] for k in FAKE_EVAL} == pytest.approx(FAKE_EVAL)
        assert e[M.EVAL_PROMPTS] == 3 and e[M.PERF_EVAL_S] > 0
        assert set(e) == set(M.EVAL_RECORD_KEYS)
    events = [e for e in logs if e["event"] == "eval"]
    assert [e[M.STEP] for e in events] == [0, 2, 3]
    assert any(e["event"] == "eval_on_training_prompts" for e in logs)  # eval.task is null
    # The evaluations took no permit: the counters balance as in a run without them.
    c = trainer.final_counters
    assert c.consumed == c.retired == 3 * 2 and c.free == c.permits
    assert sum(w.stats["eval_prompts"] for w in trainer.supervisor.workers) == 3 * 3
    # metrics.jsonl holds both kinds; the readers keep them apart.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(M.is_eval_record(r) for r in lines) == 3 and len(lines) == 6
    assert [r[M.STEP] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert [r[M.STEP] for r in read_metrics(tmp_path / "metrics.jsonl", evals=True)] == [0, 2, 3]
    # ...and the plot has its evaluation panel (5 panels: a 3 x 2 grid, one left empty).
    assert not any(e["event"] == "plot_failed" for e in logs)
    plotted = next(e for e in logs if e["event"] == "metrics_plotted")
    assert plotted["path"] == str(tmp_path / "metrics.png") and (tmp_path / "metrics.png").stat().st_size > 10_000


def test_keep_best_keeps_the_best_checkpoint_beside_the_last_k_across_a_resume(
    tmp_path, tiny_model_path, fake_engine, monkeypatch
):
    scripted = {1: 0.2, 2: 0.6, 3: 0.3, 4: 0.1, 5: 0.5, 6: 0.7, 7: 0.1}
    seen = []

    def run(self, supervisor, timeout_s, health_check=None):
        step = trainer.step
        seen.append(step)
        return {**FAKE_EVAL, M.EVAL_PASS_AT_1: scripted[step], M.EVAL_PROMPTS: 1, M.PERF_EVAL_S: 0.0}

    monkeypatch.setattr(Evaluator, "run", run)
    overrides = ["eval.every=1", "run.keep_best=eval/pass@1", "run.keep_checkpoints=2", "run.checkpoint_every=1"]
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=5", *overrides), task=LetterTask())
    with capture_logs() as logs:
        trainer.fit()
    assert seen == [1, 2, 3, 4, 5]
    assert [e["checkpoint_step"] for e in logs if e["event"] == "best_checkpoint"] == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]  # the best, then the last 2
    best = ckpt.read_best(tmp_path)
    assert best["step"] == 2 and best["value"] == 0.6 and best["metric"] == "eval/pass@1"
    ckpt.verify_checkpoint(best["path"])

    # The resumed run knows the bar: 0.7 beats 0.6, and the old best goes.
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=7", *overrides), task=LetterTask())
    trainer.fit()
    assert ckpt.read_best(tmp_path)["step"] == 6
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 7]


def test_an_engine_dying_mid_evaluation_fails_it_at_once(tiny_model_path):
    from workers.engine import EngineDeadError

    queue = RolloutQueue(0, 1)
    task = LetterTask()
    pool = RewardPool(RewardSpec(functions=[RewardFunction("task", task.reward)])).start()
    engine = FakeEngine()
    sampling = SamplingSpec(group_size=4, max_tokens=8, seed=5)
    prompts = [PromptItem(i, [1, 2, 3], Prompt(i, "p", "")) for i in range(4)]

    def make_worker(i, on_error, gate):  # an eval-only worker, as scripts/evaluate.py builds
        return GenerationWorker(
            i, build_engine=lambda: engine, queue=queue, prompts=None, sampling=sampling, rewards=pool,
            max_groups_in_flight=1, on_error=on_error, start_gate=gate,
        )

    sup = Supervisor(queue, make_worker, 1, hang_timeout_s=60)
    try:
        sup.start()
        sup.wait_ready(10)
        results, skipped = sup.evaluate(prompts, sampling, pool, timeout=30)
        assert sorted(results) == [0, 1, 2, 3] and skipped == []
        assert results[2].rewards == pytest.approx([0, 1 / 3, 2 / 3, 1]) and results[2].lengths == [1, 2, 3, 4]
        assert queue.counters().free == queue.counters().permits  # no permit taken

        FakeEngine.stall_from = 0  # the next evaluation never finishes...
        threading.Timer(0.5, lambda: setattr(engine, "closed", True)).start()  # ...its engine dies
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            sup.evaluate(prompts, sampling, pool, timeout=30)
        assert time.monotonic() - t0 < 2.0
    finally:
        FakeEngine.stall_from = 10**9
        sup.shutdown(timeout=5)
        pool.shutdown()


def test_eval_config_is_checked_with_the_key_named():
    cfg = TrainerConfig.load(None, ["eval.every=5", "eval.task={name: jsonl, path: held.jsonl}", "eval.samples=8"])
    assert cfg.eval.task.name == "jsonl" and cfg.eval.task.path == "held.jsonl"
    assert TrainerConfig.from_dict(cfg.to_dict()).eval.task.path == "held.jsonl"  # as a checkpoint restores it
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["eval.task={name: jsonl}", "eval.every=1"])
    assert e.value.key == "eval.task.path"
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["run.keep_best=eval/pass@1"])
    assert e.value.key == "eval.every"
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["run.keep_best=loss/policy", "eval.every=1"])
    assert e.value.key == "run.keep_best" and "eval/pass@1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["eval.task={name: jsonl, pth: x}"])
    assert e.value.key == "eval.task.pth"
