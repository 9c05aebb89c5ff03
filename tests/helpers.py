"""Helpers shared by the integration tests."""

import threading

import psutil

from trainer.tasks import Prompt
from workers.worker import TransientRewardError


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
    """The processes of `pids` still running (zombies count as gone)."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def failing_task():
    """A task factory (task.factory=tests.helpers:failing_task) that fails: a fatal
    error (exit 1) before any engine starts."""
    raise RuntimeError("task factory failed on purpose")
