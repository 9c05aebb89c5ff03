"""A dead or stuck engine ends the run in seconds: scripts/train.py with the tiny model
and real vLLM engines, faults injected from outside with signals."""

import pytest

from tests.faults import HANG_TIMEOUT_S, SCENARIOS, inject

# serial: the kill-to-exit limits are wall-clock limits (tests/conftest.py).
pytestmark = [pytest.mark.engine, pytest.mark.serial]

KILL_TO_EXIT_LIMIT_S = 10.0


# kill_in_training_step is left to scripts/bench_failure.py: the same detection path as
# kill_mid_generation, one more engine start (~40 s) in CI.
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("kill_") and s != "kill_in_training_step"])
def test_sigkill_engine_core_exits_1_with_run_failed(tmp_path, tiny_model_path, scenario):
    r = inject(scenario, tmp_path, tiny_model_path)
    assert r.returncode == 1
    assert r.exit_s < KILL_TO_EXIT_LIMIT_S
    assert r.last["event"] == "run_failed"
    assert r.last["error_type"] == "EngineDeadError"
    assert r.last["worker"] == "gen-0" and r.last["engine"] == 0
    assert r.last["run_id"] == next(e["run_id"] for e in r.events if e["event"] == "worker_started")
    assert r.last["exception"][0]["exc_type"] == "EngineDeadError"
    assert r.detect_s is not None and r.detect_s < r.exit_s
    assert r.leftover_pids == []
    assert r.files_left == []
    if scenario == "kill_in_eval":  # the main thread was waiting for eval results, not a batch
        assert not any(e["event"] == "train_step" for e in r.events)


def test_sigstop_engine_core_is_a_hang(tmp_path, tiny_model_path):
    r = inject("stop_mid_generation", tmp_path, tiny_model_path)
    assert r.returncode == 1
    assert r.exit_s < HANG_TIMEOUT_S + 5
    assert r.last["event"] == "run_failed" and r.last["error_type"] == "EngineHung"
    stacks = [e for e in r.events if e["event"] == "thread_stack"]
    assert {"MainThread", "gen-0"} <= {e["thread_name"] for e in stacks}
    assert all(isinstance(e["stack"], list) and e["stack"] for e in stacks)
    assert r.leftover_pids == []
    assert r.files_left == []
