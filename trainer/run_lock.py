"""One run per output directory: RUN_DIR/.lock, locked by the training process.

A second run on a directory in use stops at setup with a ConfigError on run.output_dir
naming the directory and the pid that holds it (exit 2 from scripts/train.py), before
it writes anything. The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops
it when its process ends, however it ends (SIGKILL and the OOM killer included), so a
crashed run leaves no stale lock and the launcher's restarts take it again. Processes
forked from the holder (vLLM's) do not inherit it. The file stays; only the lock on it
matters, and the pid written in it says who held it last.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib

from trainer.errors import ConfigError

LOCK_FILE = ".lock"


class OutputDirLock:
    def __init__(self, output_dir: str | os.PathLike):
        self.path = pathlib.Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        """Lock the directory (creating it), or raise ConfigError if another run holds it."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise ConfigError(
                f"run.output_dir {self.path.parent} is in use by another run (pid {holder}, holding "
                f"{self.path}): wait for it to end, stop it, or use another run.output_dir",
                key="run.output_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None
