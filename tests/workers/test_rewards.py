"""The reward pool: values, weights, group and async functions, timeouts (thread and
process executors), retries, invalid values; and a generation worker that keeps
stepping its engine while a slow reward runs."""

import pickle
import threading
import time

import pytest
from structlog.testing import capture_logs

from capacity import RolloutQueue
from tests import helpers
from tests.fake_engine import FakeEngine
from trainer.config import RewardConfig, RewardFunctionConfig
from trainer.errors import ConfigError
from trainer.rewards import build_reward_functions
from trainer.tasks import Prompt
from workers.rewards import (
    RewardFailed,
    RewardFunction,
    RewardInvalid,
    RewardPool,
    RewardSpec,
    RewardTimeout,
    TransientRewardError,
)
from workers.worker import GenerationWorker, PromptItem, SamplingSpec, ZeroStdFilter

PROMPT = Prompt(index=7, text="q", answer="")


def pool(*functions, **spec):
    return RewardPool(RewardSpec(list(functions), **spec)).start()


def wait(score, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not score.done():
        assert time.monotonic() < deadline, "scoring did not finish"
        time.sleep(0.01)
    return score.result()


def test_weighted_sum_per_sample_group_and_async_functions():
    p = pool(
        RewardFunction("length", helpers.length_reward, weight=2.0),
        RewardFunction("rank", helpers.rank_group, weight=0.5, group=True),
        RewardFunction("async", helpers.async_reward, weight=1.0),
    )
    try:
        rewards, terms = wait(p.score(["aaaa", "a", "aa"], PROMPT, 7))
    finally:
        p.shutdown()
    assert terms == {"length": [0.04, 0.01, 0.02], "rank": [2.0, 0.0, 1.0], "async": [0.25, 0.25, 0.25]}
    assert rewards == pytest.approx([2 * 0.04 + 1.0 + 0.25, 2 * 0.01 + 0.0 + 0.25, 2 * 0.02 + 0.5 + 0.25])
    assert p.stats["calls"] == 3 + 1 + 3


@pytest.mark.serial  # each attempt within 0.3-1.0 s
def test_a_stuck_call_times_out_names_function_and_prompt_and_abandons_its_thread():
    p = pool(RewardFunction("verifier", helpers.stuck_reward), timeout_s=0.3, max_attempts=2, wait_s=0.01)
    t0 = time.monotonic()
    try:
        with capture_logs() as logs:
            score = p.score(["x"], PROMPT, 7)
            with pytest.raises(RewardTimeout) as info:
                wait(score)
        elapsed = time.monotonic() - t0
    finally:
        p.shutdown()
    e = info.value
    assert (e.function, e.prompt_index, e.attempts) == ("verifier", 7, 2)
    assert 0.3 <= e.ran_s < 1.0
    assert "'verifier'" in str(e) and "prompt 7" in str(e) and "reward.timeout_s=0.3" in str(e)
    assert e.log_fields == {"reward_function": "verifier", "prompt_index": 7, "reward_ran_s": round(e.ran_s, 3), "reward_attempts": 2}
    assert 0.6 <= elapsed < 3.0  # two attempts of 0.3 s
    assert p.stats["timeouts"] == 2 and p.stats["abandoned_threads"] == 2
    assert [x["event"] for x in logs if x["event"].startswith("reward_")] == ["reward_timeout", "reward_retry", "reward_timeout"]
    # The pool still works: a fresh helper thread took the stuck one's place.
    p2 = pool(RewardFunction("length", helpers.length_reward), timeout_s=0.3)
    try:
        assert wait(p2.score(["ab"], PROMPT, 8))[0] == [0.02]
    finally:
        p2.shutdown()


def test_a_stuck_call_in_the_process_executor_kills_the_process():
    p = pool(RewardFunction("verifier", helpers.stuck_reward), executor="process", workers=1, timeout_s=1.0, max_attempts=1)
    try:
        # The child is started (and has loaded the functions) before the first call's clock.
        score = p.score(["x"], PROMPT, 7)
        deadline = time.monotonic() + 60
        while not p.process_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid,) = p.process_pids()
        with pytest.raises(RewardTimeout):
            wait(score, timeout=120)
        assert helpers.alive([pid]) == []
        assert p.stats["abandoned_threads"] == 0
    finally:
        p.shutdown()


def test_process_executor_computes_values_and_survives_a_crashing_reward():
    p = pool(
        RewardFunction("length", helpers.length_reward),
        RewardFunction("async", helpers.async_reward),
        executor="process", workers=2, timeout_s=30,
    )
    try:
        assert wait(p.score(["abc", "a"], PROMPT, 1), timeout=120) == (
            [0.03 + 0.25, 0.01 + 0.25], {"length": [0.03, 0.01], "async": [0.25, 0.25]}
        )
        pids = p.process_pids()
        assert len(pids) == 2
    finally:
        p.shutdown()
    time.sleep(0.2)
    assert helpers.alive(pids) == []

    crash = pool(RewardFunction("crash", helpers.crash_process_reward), executor="process", workers=1, max_attempts=2, wait_s=0.01)
    try:
        with pytest.raises(RewardFailed, match="reward process died") as info:
            wait(crash.score(["x"], PROMPT, 2), timeout=120)
        assert info.value.attempts == 2  # a crash is retried in a fresh process
    finally:
        crash.shutdown()


def test_unpicklable_functions_are_a_config_error_for_the_process_executor():
    with pytest.raises(ConfigError, match="must pickle") as info:
        RewardPool(RewardSpec([RewardFunction("lambda", lambda t, p: 1.0)], executor="process"))
    assert info.value.key == "reward.executor"


@pytest.mark.parametrize(
    "fn, group, match",
    [
        (helpers.nan_reward, False, r"returned nan \(float\): a reward must be a finite number"),
        (lambda t, p: float("inf"), False, r"returned inf"),
        (helpers.text_reward, False, r"returned 'high' \(str\)"),
        (lambda ts, p: [1.0], True, r"returned 1 values for 2 completions"),
        (lambda ts, p: None, True, r"not a list of 2 numbers"),
    ],
)
def test_non_finite_or_non_number_values_are_invalid_and_not_retried(fn, group, match):
    p = pool(RewardFunction("judge", fn, group=group), max_attempts=3)
    try:
        with pytest.raises(RewardInvalid, match=match) as info:
            wait(p.score(["a", "b"], PROMPT, 4))
    finally:
        p.shutdown()
    assert info.value.function == "judge" and info.value.prompt_index == 4
    assert p.stats["retries"] == 0 and p.stats["invalid"] >= 1


def test_transient_errors_are_retried_then_fail_with_the_cause():
    calls = []

    def flaky(text, prompt):
        calls.append(text)
        if len(calls) < 3:
            raise TransientRewardError("busy")
        return 1.0

    p = pool(RewardFunction("flaky", flaky), workers=1, max_attempts=3, wait_s=0.01)
    try:
        assert wait(p.score(["a"], PROMPT, 1))[0] == [1.0]
        assert p.stats["retries"] == 2

        def broken(text, prompt):
            raise ValueError("bad verifier")

        p2 = pool(RewardFunction("broken", broken), max_attempts=3)
        with pytest.raises(RewardFailed, match="bad verifier") as info:
            wait(p2.score(["a"], PROMPT, 1))
        assert isinstance(info.value.__cause__, ValueError)
        assert p2.stats["retries"] == 0  # not transient: not retried
        p2.shutdown()
    finally:
        p.shutdown()


def test_reward_functions_from_config():
    task = helpers.LetterTask()
    assert [(f.name, f.weight) for f in build_reward_functions(RewardConfig(), task)] == [("task", 1.0)]
    cfg = RewardConfig(
        functions=[
            RewardFunctionConfig(fn="task", weight=0.5),
            RewardFunctionConfig(fn="tests.helpers:rank_group", group=True, name="rank"),
            RewardFunctionConfig(fn="tests.helpers:length_reward"),
        ]
    )
    fns = build_reward_functions(cfg, task)
    assert [(f.name, f.weight, f.group) for f in fns] == [("task", 0.5, False), ("rank", 1.0, True), ("length_reward", 1.0, False)]
    assert fns[2].fn is helpers.length_reward
    with pytest.raises(ConfigError, match="cannot load 'tests.helpers:nope'") as info:
        build_reward_functions(RewardConfig(functions=[RewardFunctionConfig(fn="tests.helpers:nope")]), task)
    assert info.value.key == "reward.functions[0].fn"
    # A stuck-task instance pickles for the process executor.
    assert pickle.loads(pickle.dumps(helpers.StuckOnPromptTask())).stuck_index == 3


# ---- the worker keeps stepping while rewards run ------------------------------------------


class Prompts:
    def __init__(self):
        self.i = -1

    def next(self):
        self.i += 1
        return PromptItem(self.i, [1, 2], Prompt(self.i, "q", ""))


def test_the_engine_steps_while_a_group_is_scored_and_its_slot_stays_held():
    release = threading.Event()

    def gated(text, prompt):
        if prompt.index == 0:
            release.wait(10)
        return 1.0

    queue = RolloutQueue(max_staleness=1, groups_per_step=2)  # 4 permits
    rewards = pool(RewardFunction("gated", gated), workers=4)
    engine = FakeEngine()
    errors = []
    worker = GenerationWorker(
        0, build_engine=lambda: engine, queue=queue, prompts=Prompts(),
        sampling=SamplingSpec(group_size=2, max_tokens=4), rewards=rewards,
        max_groups_in_flight=1, on_error=lambda w, e: errors.append(e), poll_s=0.01,
    )
    worker.start()
    try:
        # Prompt 0's reward is held: the other three groups are generated and put meanwhile.
        batch = queue.get_batch(3, timeout=10, health_check=lambda: None)
        assert sorted(g.prompt_index for g in batch) == [1, 2, 3]
        c = queue.counters()
        assert c.in_flight == 1 and c.free == 0  # prompt 0's slot is held while it is scored
        steps_while_held = engine.steps
        assert steps_while_held >= 3
        release.set()
        (group,) = queue.get_batch(1, timeout=10, health_check=lambda: None)
        assert group.prompt_index == 0 and group.rewards == [1.0, 1.0] and group.reward_terms == {"gated": [1.0, 1.0]}
    finally:
        release.set()
        worker.stop()
        worker.join(10)
        rewards.shutdown()
    assert errors == []
    queue.retire(4)
    queue.check()


def test_filter_zero_std_releases_groups_without_spread_and_reports_their_prompts():
    def spread(texts, prompt):  # even prompts: all equal; odd prompts: 0, 1, ...
        return [0.0 if prompt.index % 2 == 0 else float(i) for i in range(len(texts))]

    queue = RolloutQueue(max_staleness=1, groups_per_step=2)
    rewards = pool(RewardFunction("spread", spread, group=True))
    worker = GenerationWorker(
        0, build_engine=lambda: FakeEngine(), queue=queue, prompts=Prompts(),
        sampling=SamplingSpec(group_size=2, max_tokens=4), rewards=rewards,
        max_groups_in_flight=2, on_error=lambda w, e: None, poll_s=0.01, filter_zero_std=ZeroStdFilter(100),
    )
    worker.start()
    try:
        batch = queue.get_batch(2, timeout=10, health_check=lambda: None)
    finally:
        worker.stop()
        worker.join(10)
        rewards.shutdown()
    assert all(g.prompt_index % 2 == 1 for g in batch)
    filtered = worker.take_filtered()
    assert filtered and all(i % 2 == 0 for i in filtered) and worker.take_filtered() == []
    assert queue.counters().released["filtered"] == worker.stats["filtered"] == len(filtered)


def test_filter_zero_std_budget_batches_groups_without_spread_once_spent():
    # Every group without spread: past its budget (3 per policy version) the filter lets
    # them into the batch, which fills instead of waiting for a spread that never comes.
    queue = RolloutQueue(max_staleness=0, groups_per_step=2)
    rewards = pool(RewardFunction("flat", lambda texts, prompt: [1.0] * len(texts), group=True))
    worker = GenerationWorker(
        0, build_engine=lambda: FakeEngine(), queue=queue, prompts=Prompts(),
        sampling=SamplingSpec(group_size=2, max_tokens=4), rewards=rewards,
        max_groups_in_flight=2, on_error=lambda w, e: None, poll_s=0.01, filter_zero_std=ZeroStdFilter(3),
    )
    worker.start()
    try:
        first = queue.get_batch(2, timeout=10, health_check=lambda: None)  # both permits: generation stops
    finally:
        worker.stop()
        worker.join(10)
        rewards.shutdown()
    assert [g.rewards for g in first] == [[1.0, 1.0]] * 2
    filtered = worker.take_filtered()
    assert sorted(filtered + [g.prompt_index for g in first]) == [0, 1, 2, 3, 4]
    assert len(filtered) == worker.stats["filtered"] == queue.counters().released["filtered"] == 3


def test_shutdown_ends_every_scorer_thread():
    p = pool(RewardFunction("length", helpers.length_reward), workers=3)
    wait(p.score(["a"], PROMPT, 1))
    p.shutdown()
    for thread in p.threads:
        thread.join(5)
    assert [t.name for t in p.threads if t.is_alive()] == []
