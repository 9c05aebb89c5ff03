"""The weights' shared memory: one file in /dev/shm that the trainer writes and every
engine maps, so a weight sync moves no weights through a socket.

No torch, no vLLM: the launcher (scripts/train.py) imports this to clean up what a
killed training process left.

Lifetime. The trainer creates the file at its first sync and unlinks it as soon as every
engine has mapped it: from then on the memory lives only in the mappings and goes away
with the last process that holds one, however it ends. What a kill between creation and
unlink leaves behind is named after the launcher (`rlt-<owner pid>-...`), which removes
it when the training process has ended (`sweep`).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import pathlib
import uuid

SHM_DIR = pathlib.Path("/dev/shm")
PREFIX = "rlt-"
# Set by the launcher to its PID in the training process's environment (the ranks
# inherit it): every file of the run starts with rlt-<that pid>-.
OWNER_ENV = "RLT_SHM_OWNER"
# The image's tensor dtypes: safetensors' codes and torch's names.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class SharedWeightsHandle:
    """What an engine needs to map the weights: sent once, tiny."""

    path: str
    size: int  # bytes: a safetensors image (header, then the tensors' data)
    tensors: int  # how many tensors the image holds


class SharedWeights:
    """A /dev/shm file of `size` bytes, mapped read-write here.

    `buffer` is the mapping. Raises OSError(ENOSPC) at creation when /dev/shm cannot
    hold `size` bytes (the space is reserved with posix_fallocate: writing into a
    sparse tmpfs file that has run out of room would kill the process with SIGBUS)."""

    def __init__(self, size: int, tensors: int, directory: pathlib.Path = SHM_DIR):
        owner = os.environ.get(OWNER_ENV) or str(os.getpid())
        self.path = directory / f"{PREFIX}{owner}-{os.getpid()}-{uuid.uuid4().hex[:8]}-weights"
        self.size, self.tensors = size, tensors
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self.buffer = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._linked = True

    def handle(self) -> SharedWeightsHandle:
        return SharedWeightsHandle(str(self.path), self.size, self.tensors)

    def unlink(self) -> None:
        """Remove the name; the mappings (here and in the engines) stay valid."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        unmap(self.buffer)


def no_room(error: OSError) -> bool:
    """Whether an error from SharedWeights() means /dev/shm is too small (or absent)."""
    return error.errno in (errno.ENOSPC, errno.ENOENT, errno.EOPNOTSUPP, errno.ENOSYS)


def sweep(owner: int, directory: pathlib.Path = SHM_DIR) -> list[str]:
    """Remove the files of the run whose launcher is `owner`; returns their names."""
    removed = []
    for path in sorted(directory.glob(f"{PREFIX}{owner}-*")):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


# The POSIX shared memory of Python's multiprocessing.shared_memory, which vLLM's
# message queues between the engine's processes use: /dev/shm/psm_<random>.
FOREIGN_PREFIX = "psm_"


def segments(directory: pathlib.Path = SHM_DIR) -> set[str]:
    """The names of the multiprocessing shared-memory segments there now."""
    return {p.name for p in directory.glob(f"{FOREIGN_PREFIX}*")}


def in_use(directory: pathlib.Path = SHM_DIR) -> set[str]:
    """Names under `directory` that a live process maps or holds open (from /proc; a
    process we may not inspect is skipped: its files are not ours to remove anyway)."""
    prefix = f"{directory}/"
    used = set()
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith(prefix):
                    used.add(path[len(prefix):].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target[len(prefix):].removesuffix(" (deleted)"))
        except OSError:  # gone meanwhile, or not ours
            continue
    return used


def sweep_segments(before: set[str], directory: pathlib.Path = SHM_DIR) -> list[str]:
    """Remove the multiprocessing segments made since `before` (segments() then) that
    this user owns and no live process maps or holds open: those a killed run's engine
    processes left behind. Returns their names."""
    new = sorted(segments(directory) - before)
    if not new:
        return []
    used, uid, removed = in_use(directory), os.getuid(), []
    for name in new:
        path = directory / name
        try:
            if name in used or path.stat().st_uid != uid:
                continue
            path.unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def unmap(mapping: mmap.mmap) -> None:
    """Close a mapping; with a tensor view of it still alive somewhere, leave it to the
    garbage collector to unmap later."""
    try:
        mapping.close()
    except BufferError:
        pass


def map_shared(path: str, size: int) -> mmap.mmap:
    """The engine's side: map a file the trainer made (shared, so each sync's writes
    are seen without re-mapping)."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
