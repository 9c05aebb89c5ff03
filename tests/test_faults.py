"""A dead or stuck engine ends the run in seconds: scripts/train.py with the tiny model
and real vLLM engines, faults injected from outside with signals."""

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.engine

REPO = pathlib.Path(__file__).resolve().parent.parent
KILL_TO_EXIT_LIMIT_S = 10.0


class Run:
    """scripts/train.py in a subprocess, its JSON log lines read as they come."""

    def __init__(self, tmp_path, model_path, *overrides):
        cmd = [
            sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json",
            f"model.path={model_path}", f"run.output_dir={tmp_path / 'run'}", "log.level=DEBUG",
            "algo.group_size=4", "algo.groups_per_step=2", "engine.max_model_len=512",
            "engine.max_num_seqs=16", "run.steps=50", *overrides,
        ]
        self.stderr = open(tmp_path / "stderr.txt", "w")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO, start_new_session=True
        )
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pred, timeout=240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"run ended before the expected event; last: {self.events[-3:]}")
            event = json.loads(line)  # every stdout line is one JSON object
            self.events.append(event)
            if pred(event):
                return event
        raise AssertionError(f"no expected event within {timeout}s; last: {self.events[-3:]}")

    def finish(self, timeout) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        while True:
            line = self._lines.get(timeout=5)
            if line is None:
                break
            self.events.append(json.loads(line))
        self.stderr.close()
        return rc


def engine_core_pid(started_event) -> int:
    return started_event["engine_pids"][0]


def assert_gone(pids):
    time.sleep(0.2)
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert alive == [], f"processes of the run still alive: {alive}"


def is_event(name, **fields):
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


SCENARIOS = {
    # (overrides, event after which to kill, delay after it)
    "mid_generation": (["gen.max_tokens=400", "algo.max_staleness=1"], is_event("worker_started"), 0.3),
    "training_step": (["gen.max_tokens=32", "algo.max_staleness=1"], is_event("phase", phase="train"), 0.0),
    "weight_sync": (["gen.max_tokens=32", "algo.max_staleness=1"], is_event("phase", phase="sync"), 0.0),
    # Synchronous: while the trainer trains, every permit is consumed and the worker
    # waits in acquire.
    "all_slots_held": (["gen.max_tokens=32", "algo.max_staleness=0"], is_event("phase", phase="train"), 0.0),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sigkill_engine_core_exits_1_with_run_failed(tmp_path, tiny_model_path, scenario):
    overrides, kill_after, delay = SCENARIOS[scenario]
    run = Run(tmp_path, tiny_model_path, *overrides)
    started = run.wait_for(is_event("worker_started"))
    pids = [run.proc.pid, *started["engine_pids"]]
    if kill_after(started):
        time.sleep(delay)
    else:
        run.wait_for(kill_after)
    os.kill(engine_core_pid(started), signal.SIGKILL)
    killed_at = time.monotonic()
    rc = run.finish(timeout=KILL_TO_EXIT_LIMIT_S + 5)
    exit_s = time.monotonic() - killed_at

    assert rc == 1
    assert exit_s < KILL_TO_EXIT_LIMIT_S
    last = run.events[-1]
    assert last["event"] == "run_failed"
    assert last["error_type"] == "EngineDeadError"
    assert last["worker"] == "gen-0" and last["engine"] == 0
    assert last["exception"][0]["exc_type"] == "EngineDeadError"
    assert any(e["event"] == "worker_failed" for e in run.events)
    assert_gone(pids)


def test_sigstop_engine_core_is_a_hang(tmp_path, tiny_model_path):
    hang_timeout_s = 3.0
    run = Run(tmp_path, tiny_model_path, "gen.max_tokens=400", f"engine.hang_timeout_s={hang_timeout_s}")
    started = run.wait_for(is_event("worker_started"))
    pids = [run.proc.pid, *started["engine_pids"]]
    time.sleep(0.3)
    os.kill(engine_core_pid(started), signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        rc = run.finish(timeout=hang_timeout_s + 10)
    finally:
        for pid in started["engine_pids"]:
            try:
                os.kill(pid, signal.SIGKILL)  # only if the run failed to
            except ProcessLookupError:
                pass
    exit_s = time.monotonic() - stopped_at

    assert rc == 1
    assert exit_s < hang_timeout_s + 5
    last = run.events[-1]
    assert last["event"] == "run_failed" and last["error_type"] == "EngineHung"
    stacks = [e for e in run.events if e["event"] == "thread_stack"]
    assert {"MainThread", "gen-0"} <= {e["thread_name"] for e in stacks}
    assert all(isinstance(e["stack"], list) and e["stack"] for e in stacks)
    assert_gone(pids)
