"""Errors the trainer raises on bad input, and the process exit codes.

This module is the one home of the exit codes: `scripts/train.py` maps exceptions to
them and the tests assert them.
"""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0
    FATAL = 1  # engine dead, hang, worker failure, any unexpected error
    BAD_INPUT = 2  # bad config, missing model, malformed dataset
    SIGINT = 130  # stopped by SIGINT after a final checkpoint
    SIGTERM = 143  # stopped by SIGTERM after a final checkpoint


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM (or `Trainer.request_stop()`).

    graceful: the first signal; the current step was finished (or, while waiting for
    rollouts, abandoned: nothing of it was trained) and `checkpoint` written. Otherwise a
    second signal stopped the run at once, without a checkpoint. Either way the engines
    were shut down. A KeyboardInterrupt, so `except Exception` does not swallow it."""

    def __init__(self, signum: int, graceful: bool, step: int, checkpoint: str | None = None):
        self.signum = signum
        self.graceful = graceful
        self.step = step
        self.checkpoint = checkpoint
        how = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by signal {signum} at step {step} ({'graceful' if graceful else 'at once'}; {how})")

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.SIGTERM if self.signum == signal.SIGTERM else ExitCode.SIGINT


class ConfigError(ValueError):
    """Bad input found before any engine starts. `key` names the config key at fault."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(ConfigError):
    """A dataset file that cannot be used; names the file and, where known, the line."""

    def __init__(self, message: str, path: str, line: int | None = None, key: str | None = None):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}", key=key)
        self.path = path
        self.line = line


class ModelError(ConfigError):
    """A model directory that is missing or cannot be loaded; names the path."""

    def __init__(self, message: str, path: str, key: str | None = "model.path"):
        super().__init__(f"{path}: {message}", key=key)
        self.path = path


class NonFiniteSteps(RuntimeError):
    """algo.max_nonfinite_steps steps in a row had a NaN or infinite loss or gradient
    norm; none of them changed the weights. A fatal error (exit 1)."""
