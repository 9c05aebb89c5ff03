"""The launcher in scripts/train.py without an engine: the process group it cleans up,
the parent-death signal, restarts after fatal errors, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scripts import train
from tests.faults import REPO
from tests.helpers import alive
from workers.shm import PREFIX, SHM_DIR


def test_kill_process_group_takes_down_what_ignores_sigterm_and_leaves_the_rest():
    # A "training process" whose child ignores SIGTERM, and dies first (like a
    # SIGKILLed trainer leaving its engine behind).
    leader = subprocess.Popen(
        ["bash", "-c", "trap '' TERM; (trap '' TERM; exec sleep 60) & echo $!; wait"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    orphan = int(leader.stdout.readline())
    bystander = subprocess.Popen(["sleep", "60"])  # another group: must survive
    try:
        os.kill(leader.pid, signal.SIGKILL)
        os.waitid(os.P_PID, leader.pid, os.WEXITED | os.WNOWAIT)
        assert alive([orphan]) == [orphan]
        t0 = time.monotonic()
        assert train._kill_process_group(leader.pid) == [orphan]
        assert time.monotonic() - t0 < 5
        assert alive([orphan]) == []
        assert alive([bystander.pid]) == [bystander.pid]
        assert train._kill_process_group(leader.pid) == []  # nothing left: a no-op
    finally:
        leader.wait()
        bystander.kill()
        bystander.wait()
        for pid in alive([orphan]):
            os.kill(pid, signal.SIGKILL)


def test_the_launcher_as_subreaper_kills_orphans_that_left_the_group(tmp_path):
    # A rank of trainer.ranks runs in a session of its own; when it dies, its engines
    # are orphaned outside the training process's group. The launcher, a subreaper,
    # inherits them and kills them too. Run in a subprocess: pytest must not become one.
    code = f"""
import os, signal, subprocess, sys, time
sys.path.insert(0, {str(REPO)!r})
from scripts import train
train._become_subreaper()
child = subprocess.Popen(["bash", "-c", "setsid bash -c 'trap \\"\\" TERM; exec sleep 60' & echo $!; wait"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
orphan = int(child.stdout.readline())
time.sleep(0.2)
os.kill(child.pid, signal.SIGKILL)
os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
print(orphan, os.getpgid(orphan) != child.pid, train._kill_process_group(child.pid, launcher=os.getpid()), flush=True)
child.wait()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    orphan, outside_group, killed = out.stdout.split(" ", 2)
    assert outside_group == "True", out
    assert killed.strip() == f"[{orphan}]", out
    assert alive([int(orphan)]) == []


def test_the_training_child_gets_sigterm_when_the_launcher_dies(tmp_path):
    flag = tmp_path / "got-sigterm"
    child_code = (
        "import os, signal, sys, time; sys.path.insert(0, %r); from scripts import train; "
        "signal.signal(signal.SIGTERM, lambda *a: (open(%r, 'w').close(), os._exit(0))); "
        "train._die_with_launcher(os.getppid()); print('ready', flush=True); time.sleep(60)"
    ) % (str(REPO), str(flag))
    launcher_code = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', %r]); "
        "print(p.pid, flush=True); time.sleep(60)"
    ) % child_code
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline() == "ready\n"  # the child shares the launcher's stdout
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists()
    finally:
        for pid in alive([child]):
            os.kill(pid, signal.SIGKILL)


def run_cli(tmp_path, *args, timeout=120):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_a_fatal_error_is_restarted_at_most_max_restarts_times(tmp_path, tiny_model_path):
    rc, events = run_cli(
        # Overrides before and after the option: the restart appends one more.
        tmp_path, f"model.path={tiny_model_path}", f"run.output_dir={tmp_path / 'run'}", "--max-restarts", "1",
        "task.name=python", "task.factory=tests.helpers:failing_task",
    )
    assert rc == 1
    names = [e["event"] for e in events]
    assert names.count("training_process_started") == 2
    assert names.count("run_failed") == 2 and names.count("run_restart") == 1
    restart = events[names.index("run_restart")]
    assert restart["restart"] == 1 and restart["max_restarts"] == 1 and restart["exit_code"] == 1
    assert names.index("run_restart") < names.index("run_failed", names.index("run_restart"))
    assert events[-1]["event"] == "run_failed" and "failed on purpose" in events[-1]["error"]
    children = [e["pid"] for e in events if e["event"] == "training_process_started"]
    assert alive(children) == []


@pytest.mark.serial  # every run file in /dev/shm before and after
def test_shared_memory_a_killed_training_process_left_is_removed(tmp_path, tiny_model_path):
    before = set(SHM_DIR.glob(f"{PREFIX}*"))
    rc, events = run_cli(
        tmp_path, f"model.path={tiny_model_path}", f"run.output_dir={tmp_path / 'run'}",
        "task.name=python", "task.factory=tests.helpers:shm_then_sigkill",
    )
    assert rc == 1
    last = events[-1]
    assert last["event"] == "run_failed" and last["error_type"] == "ProcessKilled" and last["signal"] == "SIGKILL"
    (removed,) = last["shm_removed"]
    assert removed.startswith(f"{PREFIX}") and removed.endswith("-weights")
    assert set(SHM_DIR.glob(f"{PREFIX}*")) == before


def test_a_run_owns_its_output_dir_and_a_killed_run_leaves_no_lock(tmp_path, tiny_model_path):
    run_dir, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    common = [f"model.path={tiny_model_path}", f"run.output_dir={run_dir}", "task.name=python"]
    holder = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json", *common,
         "task.factory=tests.helpers:hold_then_sigkill"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "RLT_TEST_READY": str(ready), "RLT_TEST_GO": str(go)},
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the first run never got to its task"
        # A second run on the same directory: refused before it writes anything.
        rc, events = run_cli(tmp_path, *common, "task.factory=tests.helpers:failing_task")
        assert rc == 2
        error = events[-1]
        assert error["event"] == "config_error" and error["key"] == "run.output_dir"
        child = next(e for e in map(json.loads, holder.stdout) if e["event"] == "training_process_started")
        assert str(run_dir) in error["error"] and f"pid {child['pid']}" in error["error"]
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
        # SIGKILL of the holder: the kernel drops its lock; the next run gets past it.
        go.touch()
        out, _ = holder.communicate(timeout=60)
        assert holder.returncode == 1 and json.loads(out.splitlines()[-1])["error_type"] == "ProcessKilled"
        rc, events = run_cli(tmp_path, *common, "task.factory=tests.helpers:failing_task")
        assert rc == 1 and "failed on purpose" in events[-1]["error"]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_bad_input_is_not_restarted_and_starts_no_training_process(tmp_path):
    rc, events = run_cli(tmp_path, "--max-restarts", "3", "run.stepz=3")
    assert rc == 2
    assert [e["event"] for e in events] == ["config_error"]
    assert events[0]["key"] == "run.stepz"


def test_a_negative_max_restarts_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--max-restarts", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--max-restarts: must be >= 0" in proc.stderr


def test_a_rank_killed_from_outside_is_named_not_the_one_the_agent_stopped_after_it():
    """Rank 1 SIGKILLed, then rank 0 SIGTERMed by torch's agent in the same second (the
    failures' timestamps are whole seconds): the run_failed names rank 1."""
    import types

    import structlog

    def failure(exitcode, pid):
        return types.SimpleNamespace(exitcode=exitcode, pid=pid, timestamp=1700000000)

    failures = {0: failure(-signal.SIGTERM, 100), 1: failure(-signal.SIGKILL, 101)}
    with structlog.testing.capture_logs() as logs:
        rc = train._ranks_failed(structlog.get_logger(), failures, [])
    assert rc == 1
    (line,) = logs
    assert line["event"] == "run_failed" and line["error_type"] == "ProcessKilled"
    assert (line["rank"], line["signal"], line["pid"]) == (1, "SIGKILL", 101)
