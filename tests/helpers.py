"""Helpers shared by the integration tests."""

import asyncio
import math
import os
import stat
import threading
import time

from trainer.tasks import Prompt
from workers.processes import pid_running
from workers.rewards import TransientRewardError


class LetterTask:
    """Rewards the share of the letter 'e' in the completion: a random tiny model gets
    varied rewards within a group, so every step has a learning signal. `fail(index,
    call)` decides whether a reward call raises TransientRewardError."""

    def __init__(self, fail=lambda index, call: False):
        self.fail = fail
        self.calls = 0
        self.lock = threading.Lock()

    def prompt(self, index):
        return Prompt(index=index, text=f"Write a word number {index}:", answer="")

    def reward(self, text, prompt):
        with self.lock:
            self.calls += 1
            call = self.calls
        if self.fail(prompt.index, call):
            raise TransientRewardError(f"verifier busy (call {call})")
        return text.count("e") / max(len(text), 1)


def run_threads() -> list[str]:
    """Names of the trainer's threads still alive (workers and watchdog)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("gen-", "watchdog"))]


def alive(pids) -> list[int]:
    """The processes of `pids` still running (a thread of theirs alive)."""
    return [pid for pid in pids if pid_running(pid)]


def tmp_leftovers() -> set[str]:
    """What a vLLM engine can leave in the temporary directory: its ZeroMQ sockets,
    torch's FileStore (vllm_dist_*), our scratch directories (rlt-*)."""
    from workers.shm import PREFIX, TMP_DIR

    found = set()
    for entry in os.scandir(TMP_DIR):
        try:
            if entry.name.startswith(("vllm_dist_", PREFIX)) or stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                found.add(entry.name)
        except FileNotFoundError:
            pass
    return found


def failing_task():
    """A task factory (task.factory=tests.helpers:failing_task) that fails: a fatal
    error (exit 1) before any engine starts."""
    raise RuntimeError("task factory failed on purpose")


def hold_then_sigkill():
    """A task factory that holds the run (its output directory locked) until the file
    $RLT_TEST_GO exists, announcing itself with $RLT_TEST_READY, then is SIGKILLed."""
    import os
    import pathlib
    import signal
    import time

    pathlib.Path(os.environ["RLT_TEST_READY"]).touch()
    deadline = time.monotonic() + 120
    while not pathlib.Path(os.environ["RLT_TEST_GO"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def shm_then_sigkill():
    """A task factory that makes a weights shared-memory file, as the trainer's first
    sync does, and is SIGKILLed before anything could unlink it (the OOM killer's way)."""
    import os
    import signal

    from workers.shm import SharedWeights

    SharedWeights(4096, 0)
    os.kill(os.getpid(), signal.SIGKILL)


# ---- reward functions (module level: the process executor pickles them by name) -------


def length_reward(text, prompt):
    return len(text) / 100


def nan_reward(text, prompt):
    return math.nan


def text_reward(text, prompt):
    return "high"


def stuck_reward(text, prompt):
    """Never returns (within a test's lifetime): a stuck verifier."""
    time.sleep(3600)
    return 1.0


def slow_reward(text, prompt):
    """A verifier that takes 0.2 s per call, waiting on I/O."""
    time.sleep(0.2)
    return 1.0


async def async_reward(text, prompt):
    await asyncio.sleep(0.01)
    return 0.25


def rank_group(texts, prompt):
    """Group-level: each completion's rank by length among the group (0 = shortest)."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    ranks = [0.0] * len(texts)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def crash_process_reward(text, prompt):
    """Kills its own process: a segfaulting verifier."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class StuckOnPromptTask(LetterTask):
    """LetterTask whose reward never returns for prompt `stuck_index` (default 3),
    picklable (no lock), for the process executor too."""

    stuck_index = 3

    def __init__(self):
        self.calls = 0

    def __getstate__(self):
        return {}

    def reward(self, text, prompt):
        if prompt.index == self.stuck_index:
            time.sleep(3600)
        return text.count("e") / max(len(text), 1)


class NanOnPromptTask(StuckOnPromptTask):
    """Returns NaN for prompt 3."""

    def reward(self, text, prompt):
        if prompt.index == 3:
            return math.nan
        return text.count("e") / max(len(text), 1)


def stuck_on_prompt_5(text, prompt):
    """A judge that never returns for prompt 5 and gives 0.5 elsewhere."""
    if prompt.index == 5:
        time.sleep(3600)
    return 0.5
