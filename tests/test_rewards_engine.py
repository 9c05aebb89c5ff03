"""Rewards against real engines and the tiny model: a stuck reward ends the run as a
RewardTimeout (not a hang, not a sync timeout) within seconds of reward.timeout_s; a NaN
reward is named as such; with skip, stuck rewards and overlong prompts are skipped and
the run completes with its counters balanced."""

import json
import threading
import time

import pytest

from tests.faults import Run, event_time, is_event
from tests.helpers import NanOnPromptTask, alive, run_threads
from tests.test_in_process import config as in_process_config
from trainer import Trainer
from trainer import metrics as M
from workers.rewards import RewardInvalid

pytestmark = pytest.mark.engine

TIMEOUT_S = 2.0


def test_a_stuck_reward_ends_the_run_as_a_reward_timeout_naming_function_and_prompt(tmp_path, tiny_model_path):
    run = Run(
        tmp_path, tiny_model_path, "task.factory=tests.helpers:StuckOnPromptTask", "gen.max_tokens=16",
        f"reward.timeout_s={TIMEOUT_S}", "reward.max_attempts=1",
    )
    started = run.wait_for(is_event("worker_started"))
    timeout = run.wait_for(is_event("reward_timeout"), timeout=120)
    rc = run.finish(timeout=60)
    ended = time.time()
    time.sleep(0.2)
    assert rc == 1
    last = run.events[-1]
    assert last["event"] == "run_failed", run.events[-5:]
    assert last["error_type"] == "RewardTimeout"
    assert (last["reward_function"], last["prompt_index"], last["reward_attempts"]) == ("task", 3, 1)
    assert TIMEOUT_S <= last["reward_ran_s"] < TIMEOUT_S + 1
    assert "reward 'task' for prompt 3" in last["error"] and "reward.timeout_s=2.0" in last["error"]
    names = {e["event"] for e in run.events}
    assert not names & {"engine_hung", "thread_stack"}
    assert not any(e.get("error_type") in ("EngineHung", "WeightSyncTimeout") for e in run.events)
    # From the stuck call's start to the process's exit: the timeout plus a few seconds.
    stuck_started = event_time(timeout) - timeout["ran_s"]
    took = ended - stuck_started
    print(f"stuck reward call start -> run exit: {took:.1f}s (reward.timeout_s={TIMEOUT_S})")
    assert took < TIMEOUT_S + 10, took
    assert alive([run.proc.pid, *started["engine_pids"]]) == []


def config(tmp_path, model_path, *overrides):
    return in_process_config(tmp_path, model_path, "engine.max_model_len=128", *overrides)


def reward_pids_while_training(trainer, found, timeout=240):
    """Poll the reward pool's process PIDs until training starts (a background thread)."""
    def poll():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not trainer.history:
            if trainer.rewards is not None:
                found.update(trainer.rewards.process_pids())
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


def test_a_nan_reward_fails_the_run_naming_it_in_the_process_executor(tmp_path, tiny_model_path):
    trainer = Trainer(
        config(tmp_path, tiny_model_path, "run.steps=20", "reward.executor=process", "reward.workers=2"),
        task=NanOnPromptTask(),
    )
    pids: set[int] = set()
    poller = reward_pids_while_training(trainer, pids)
    with pytest.raises(RewardInvalid, match=r"reward 'task' for prompt 3: returned nan \(float\)") as info:
        trainer.fit()
    poller.join(5)
    assert info.value.log_fields["prompt_index"] == 3
    # The NaN reached neither the advantages nor the weights: every trained step is finite.
    assert all(h[M.LOSS_NONFINITE_SKIPPED] == 0 and h[M.REWARD_MEAN] is not None for h in trainer.history)
    assert run_threads() == []
    assert len(pids) == 2 and alive(pids) == []
    trainer.queue.check()


def test_skip_stuck_rewards_and_overlong_prompts_and_complete(tmp_path, tiny_model_path):
    rows = [{"prompt": f"Write a word number {i}:", "answer": "e"} for i in range(12)]
    rows[2]["prompt"] = "long " * 300  # > 128 - 16 tokens: cannot fit
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(
        config(
            tmp_path, tiny_model_path, "run.steps=3", "task.name=jsonl", f"task.path={data}",
            "reward.functions=[{fn: task}, {fn: 'tests.helpers:stuck_on_prompt_5', name: judge, weight: 0.5}]",
            "reward.on_error=skip", "reward.timeout_s=0.5", "reward.max_attempts=1",
        )
    )
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        history = trainer.fit()
    assert len(history) == 3
    skipped = [e for e in logs if e["event"] == "prompt_skipped"]
    assert skipped and skipped[0]["prompt_index"] == 2 and skipped[0]["where"] == f"{data}:3"
    assert [e["rows"] for e in logs if e["event"] == "overlong_prompts"] == [1]
    assert history[-1][M.DATA_PROMPTS_SKIPPED] >= 1
    assert all(M.reward_function_mean("task") in h and M.reward_function_mean("judge") in h for h in history)
    # Prompt 5's group was given up after its judge timed out; the others trained.
    assert trainer.rewards.stats["timeouts"] >= 1
    failed = [e for e in logs if e["event"] == "reward_failed_group_skipped"]
    assert failed and failed[0]["prompt_index"] == 5 and failed[0]["reward_function"] == "judge"
    assert 2 in trainer.trained and 5 not in trainer.trained
    c = trainer.final_counters  # assert_drained passed inside fit
    assert c.released["failed"] >= 1 and c.consumed == c.retired == 6
    assert run_threads() == []


def test_the_math_task_trains_through_the_cli_with_the_process_executor(tmp_path, tiny_model_path):
    from tests.math_sample import write_math_sample

    files = write_math_sample(tmp_path / "data")
    run = Run(
        tmp_path, tiny_model_path, "task.name=math", f"task.path={files['parquet']}", "task.prompt_field=question",
        "run.steps=2", "gen.max_tokens=16", "reward.executor=process", "reward.workers=2",
    )
    run.wait_for(is_event("run_done"), timeout=240)
    assert run.finish(timeout=60) == 0
    steps = [e for e in run.events if e["event"] == "train_step"]
    assert [s["step"] for s in steps] == [0, 1]
    # A random tiny model answers no GSM8K question: every reward is a real 0 from math-verify.
    assert all(s[M.REWARD_MEAN] == 0.0 and s[M.REWARD_TIMEOUTS] == 0 and s[M.REWARD_GROUPS_SKIPPED] == 0 for s in steps)
