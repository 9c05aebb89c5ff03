"""Fault injection against scripts/train.py: a real run in a subprocess, its JSON log
read line by line, a signal sent to its EngineCore at a chosen moment. Used by
tests/test_faults.py and scripts/bench_failure.py."""

import dataclasses
import datetime
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

from tests.helpers import alive
from workers.shm import PREFIX, SHM_DIR, TMP_DIR

REPO = pathlib.Path(__file__).resolve().parent.parent


# A small job whose steps all train (small=True, the default).
SMALL_RUN = (
    "algo.group_size=4", "algo.groups_per_step=2", "engine.max_model_len=512", "engine.max_num_seqs=16",
    "run.steps=50",
    # Varied rewards for a random model: every step really trains.
    "task.name=python", "task.factory=tests.helpers:LetterTask",
)


class Run:
    """scripts/train.py in a subprocess, its JSON log lines read as they come. The
    script is a launcher: `children` are the PIDs of its training processes."""

    def __init__(self, tmp_path, model_path, *overrides, env: dict | None = None, small: bool = True):
        cmd = [
            sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json",
            f"model.path={model_path}", f"run.output_dir={tmp_path / 'run'}", "log.level=DEBUG",
            *(SMALL_RUN if small else ()), *overrides,
        ]
        self.stderr = open(tmp_path / "stderr.txt", "w")
        self.started_at = time.time()  # comparable with event_time()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.exited_at: float | None = None  # set by finish()
        self.events: list[dict] = []
        self.children: list[int] = []  # training processes
        self.pids: list[int] = []  # every process of the run its log names: training, ranks, engines
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def files_left(self) -> list[str]:
        """The files of this run still there, named after the launcher (workers/shm.py):
        the weights' shared memory in /dev/shm, the engines' scratch directories in /tmp."""
        return sorted(p.name for d in (SHM_DIR, TMP_DIR) for p in d.glob(f"{PREFIX}{self.proc.pid}-*"))

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
            self._record(event)
            if pred(event):
                return event
        raise AssertionError(f"no expected event within {timeout}s; last: {self.events[-3:]}")

    def first(self, pred, timeout=240.0) -> dict:
        """The first event matching `pred`, whether already read or still to come."""
        seen = next((e for e in self.events if pred(e)), None)
        return seen if seen is not None else self.wait_for(pred, timeout)

    def _record(self, event: dict) -> None:
        self.events.append(event)
        if event.get("event") == "training_process_started":
            self.children.append(event["pid"])
        if event.get("event") in ("training_process_started", "setup"):
            self.pids.append(event["pid"])
        if event.get("event") == "worker_started":
            self.pids.extend(event["engine_pids"])

    def finish(self, timeout) -> int:
        rc = None
        try:
            rc = self.proc.wait(timeout)
            self.exited_at = time.time()
        except subprocess.TimeoutExpired:
            pass  # killed below; the log read to its end says where it was
        finally:
            if self.proc.poll() is None:
                # The launcher, then its training processes (each in its own group).
                for pgid in [self.proc.pid, *self.children]:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for pid in alive(self.pids):  # ranks and engines live in sessions of their own
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait(10)
        # Every process that inherited stdout must be gone before it reads as ended.
        deadline = time.monotonic() + 30
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"stdout still open 30 s after exit, held by {pipe_holders(self.proc.stdout)}")
            if line is None:
                break
            self._record(json.loads(line))
        self.stderr.close()
        if rc is None:
            raise AssertionError(f"the run did not exit within {timeout} s; last: {self.events[-5:]}")
        return rc


def pipe_holders(pipe) -> list[str]:
    """The processes that hold the other end of `pipe` (from /proc): for diagnostics."""
    target = f"pipe:[{os.fstat(pipe.fileno()).st_ino}]"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if pid != str(os.getpid()) and any(
                os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                found.append(f"{pid}: {open(f'/proc/{pid}/cmdline').read().replace(chr(0), ' ')[:120]}")
        except OSError:
            pass
    return found


def event_time(event) -> float:
    """The event's timestamp as seconds since the epoch (comparable with time.time())."""
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def is_event(name, **fields):
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


HANG_TIMEOUT_S = 3.0

# name -> (overrides, the event after which to signal, delay after it, signal)
SCENARIOS = {
    "kill_mid_generation": (
        ["gen.max_tokens=400", "algo.max_staleness=1"], is_event("worker_started"), 0.3, signal.SIGKILL
    ),
    "kill_in_training_step": (
        ["gen.max_tokens=32", "algo.max_staleness=1"], is_event("phase", phase="train"), 0.0, signal.SIGKILL
    ),
    "kill_in_weight_sync": (
        ["gen.max_tokens=32", "algo.max_staleness=1"], is_event("phase", phase="sync"), 0.0, signal.SIGKILL
    ),
    # Synchronous: while the trainer trains, every permit is consumed and the worker
    # waits in acquire.
    "kill_all_slots_held": (
        ["gen.max_tokens=32", "algo.max_staleness=0"], is_event("phase", phase="train"), 0.0, signal.SIGKILL
    ),
    # During an evaluation (before the first step): the main thread waits for eval
    # results, not for a batch.
    "kill_in_eval": (
        ["gen.max_tokens=8", "eval.before_train=true", "eval.every=10", "eval.prompts=16", "eval.max_tokens=400"],
        is_event("phase", phase="eval"), 0.3, signal.SIGKILL,
    ),
    # Alive but stuck: the progress watchdog's case.
    "stop_mid_generation": (
        ["gen.max_tokens=400", f"engine.hang_timeout_s={HANG_TIMEOUT_S}"],
        is_event("worker_started"), 0.3, signal.SIGSTOP,
    ),
}


@dataclasses.dataclass
class FaultResult:
    scenario: str
    returncode: int
    exit_s: float  # signal to process exit
    detect_s: float | None  # signal to the worker_failed event
    events: list[dict]
    leftover_pids: list[int]  # processes of the run alive after it exited
    files_left: list[str]  # the run's files left: shared memory in /dev/shm, scratch dirs in /tmp

    @property
    def last(self) -> dict:
        return self.events[-1] if self.events else {}


def inject(scenario: str, workdir: pathlib.Path, model_path, exit_limit_s: float = 30.0) -> FaultResult:
    """Start a run, signal its EngineCore as the scenario says, wait for the exit."""
    overrides, trigger, delay, sig = SCENARIOS[scenario]
    run = Run(workdir, model_path, *overrides)
    started = run.wait_for(is_event("worker_started"))
    engine_pids = started["engine_pids"]
    run.first(trigger)  # the main thread may have logged it before worker_started
    time.sleep(delay)
    signalled_wall, signalled = time.time(), time.monotonic()
    os.kill(engine_pids[0], sig)  # EngineCore
    try:
        rc = run.finish(timeout=exit_limit_s)
        exit_s = time.monotonic() - signalled
        time.sleep(0.2)
        leftovers = alive([run.proc.pid, *engine_pids])
    finally:
        for pid in alive(engine_pids):  # only if the run failed to
            os.kill(pid, signal.SIGKILL)
    failed = [e for e in run.events if e.get("event") == "worker_failed"]
    detect_s = event_time(failed[0]) - signalled_wall if failed else None
    return FaultResult(scenario, rc, exit_s, detect_s, run.events, leftovers, run.files_left())
