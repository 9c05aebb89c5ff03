"""The weights' shared memory: one file in /dev/shm that the trainer writes and every
engine maps, so a weight sync moves no weights through a socket.

No torch, no vLLM: the launcher (scripts/train.py) imports this to clean up what a
killed training process left.

Lifetime. The trainer creates the file at its first sync and unlinks it as soon as every
engine has mapped it: from then on the memory lives only in the mappings and goes away
with the last process that holds one, however it ends. What a kill between creation and
unlink leaves behind is named after the launcher (`rlt-<owner pid>-...`), which removes
it when the training process has ended (`sweep`).

The same naming covers each engine's scratch directory in the temporary directory
(`scratch_dir`), where its processes put what vLLM leaves in /tmp when they are killed:
the ZeroMQ sockets (ipc://) and torch's FileStore (vllm_dist_*).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import pathlib
import shutil
import tempfile
import uuid

SHM_DIR = pathlib.Path("/dev/shm")
TMP_DIR = pathlib.Path(tempfile.gettempdir())
PREFIX = "rlt-"
# Set by the launcher to its PID in the training process's environment (the ranks
# inherit it): every file of the run starts with rlt-<that pid>-.
OWNER_ENV = "RLT_SHM_OWNER"
# Set by workers/engine.py while it builds an engine: that engine's scratch directory,
# where workers/vllm_plugin.py puts vLLM's FileStore in the engine's processes.
SCRATCH_ENV = "RLT_ENGINE_SCRATCH"
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
        self.path = directory / f"{_run_prefix()}{uuid.uuid4().hex[:8]}-weights"
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


def _run_prefix() -> str:
    owner = os.environ.get(OWNER_ENV) or str(os.getpid())
    return f"{PREFIX}{owner}-{os.getpid()}-"


def scratch_dir(label: str, directory: pathlib.Path = TMP_DIR) -> pathlib.Path:
    """A new private directory for the run's files outside /dev/shm; the caller
    removes it (shutil.rmtree), `sweep` does if the process was killed first."""
    return pathlib.Path(tempfile.mkdtemp(prefix=f"{_run_prefix()}{label}-", dir=directory))


def scratch_label(name: str) -> str:
    """The label a scratch directory named `name` was made with (see scratch_dir)."""
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not a scratch directory of a run")
    return name[len(PREFIX):].split("-", 2)[2].rsplit("-", 1)[0]  # past owner and pid, before mkdtemp's suffix


def no_room(error: OSError) -> bool:
    """Whether an error from SharedWeights() means /dev/shm is too small (or absent)."""
    return error.errno in (errno.ENOSPC, errno.ENOENT, errno.EOPNOTSUPP, errno.ENOSYS)


def sweep(owner: int, directory: pathlib.Path = SHM_DIR) -> list[str]:
    """Remove the files and scratch directories of the run whose launcher is `owner`;
    returns their names."""
    removed = []
    for path in sorted(directory.glob(f"{PREFIX}{owner}-*")):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


# What Python's multiprocessing makes in /dev/shm, and vLLM's engine processes use:
# shared memory for their message queues (psm_<random>) and named semaphores, such as
# the lock its executor shares with its worker (sem.mp-<random>). A process that is
# killed leaves them. glibc maps a semaphore under a temporary name, so the process's
# maps show "sem.XXXXXX (deleted)" for a live sem.mp-<random>: files are matched to
# what processes hold by inode, not by name.
FOREIGN_PREFIXES = ("psm_", "sem.mp-")


def segments(directory: pathlib.Path = SHM_DIR) -> set[str]:
    """The names of the multiprocessing segments there now."""
    return set(_inodes(directory))


def _inodes(directory: pathlib.Path) -> dict[str, int]:
    """name -> inode of the multiprocessing segments in `directory`."""
    try:
        with os.scandir(directory) as entries:
            return {e.name: e.inode() for e in entries if e.name.startswith(FOREIGN_PREFIXES)}
    except FileNotFoundError:
        return {}


def _held_inodes(proc: pathlib.Path, directory: pathlib.Path) -> set[int]:
    """Inodes of the files under `directory` that the process at `proc` (/proc/<pid>)
    maps or holds open; raises OSError if it is gone, or not ours to inspect."""
    prefix, held = f"{directory}/", set()
    for line in (proc / "maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5].startswith(prefix):
            held.add(int(fields[4]))
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                held.add(os.stat(fd).st_ino)
        except OSError:  # closed meanwhile
            continue
    return held


def held_by(pids: list[int] | None = None, directory: pathlib.Path = SHM_DIR) -> set[str]:
    """The multiprocessing segments in `directory` that the processes `pids` (None:
    every live process we may inspect) map or hold open now."""
    procs = pathlib.Path("/proc").glob("[0-9]*") if pids is None else [pathlib.Path(f"/proc/{p}") for p in pids]
    held = set()
    for proc in procs:
        try:
            held |= _held_inodes(proc, directory)
        except OSError:  # gone meanwhile (it holds nothing now), or not ours
            continue
    return {name for name, inode in _inodes(directory).items() if inode in held}


def release(names: set[str], directory: pathlib.Path = SHM_DIR) -> list[str]:
    """Remove the multiprocessing segments `names` of engine processes we killed (and
    that this process does not hold), and take them off the resource tracker that
    those processes shared with this one, which would otherwise warn about each at exit
    and try to unlink it again. Returns the names removed."""
    from multiprocessing import resource_tracker

    mine = held_by([os.getpid()], directory)  # not expected; never pull one from under us
    removed = []
    for name in sorted(names - mine):
        try:
            (directory / name).unlink()
        except FileNotFoundError:  # its process removed it after all
            pass
        else:
            removed.append(name)
        # psm_x is tracked as "/psm_x"; sem.mp-x as "/mp-x". Register first: the
        # tracker keeps a set, so register + unregister leaves it without the name
        # whether or not it had it (a process that made it may have died before).
        tracked, kind = ("/" + name, "shared_memory") if name.startswith("psm_") else ("/" + name[4:], "semaphore")
        resource_tracker.register(tracked, kind)
        resource_tracker.unregister(tracked, kind)
    return removed


def sweep_segments(before: set[str], directory: pathlib.Path = SHM_DIR) -> list[str]:
    """Remove the multiprocessing segments made since `before` (segments() then) that
    this user owns and no live process maps or holds open: those a killed run's engine
    processes left behind. Returns their names."""
    new = sorted(segments(directory) - before)
    if not new:
        return []
    used, uid, removed = held_by(None, directory), os.getuid(), []
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
