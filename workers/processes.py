"""When a process is gone. No torch, no vLLM: the launcher (scripts/train.py) imports it.

A process is gone when its last thread is, not when its main thread is. Under SIGKILL the
main thread can exit first and show the process as a zombie while another thread still
unmaps its memory (25 ms for a 4 GiB process on this 2-core machine under load); such a
process is not yet waitable, so its owner (multiprocessing's `is_alive()`, say) still sees
it running. Taking that zombie for the end is the likely reason vLLM's process manager
once found EngineCore alive after Engine.shutdown and force-killed it (#15).
"""

from __future__ import annotations

import os

import psutil


def running(p: psutil.Process) -> bool:
    """Whether any thread of the process is still alive. Leaves a child unreaped."""
    try:
        if not p.is_running():  # also guards against a recycled PID
            return False
        try:
            # Our child: waitable once its last thread is gone; WNOWAIT leaves the
            # reaping to its owner.
            return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:  # another's child: a zombie with its last thread left
            return p.status() != psutil.STATUS_ZOMBIE or p.num_threads() > 1
    except psutil.NoSuchProcess:
        return False


def pid_running(pid: int) -> bool:
    """`running` for a bare PID."""
    try:
        return running(psutil.Process(pid))
    except psutil.Error:
        return False
