"""Engine.shutdown's wait for the processes it kills (no engine needed).

A process is gone when its last thread is, not when its main thread is: under SIGKILL
the main thread of EngineCore can show as a zombie while another thread still unmaps its
memory; taking that for the end likely let vLLM's process manager, called right after,
find it alive and force-kill it once (#15). Here
the main thread leaves with pthread_exit while another thread sleeps, which holds that
state for as long as the test needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from workers.engine import _running, _signal_and_wait

MAIN_THREAD_EXITS = (
    "import ctypes, threading, time; "
    "threading.Thread(target=time.sleep, args=(60,)).start(); "
    "ctypes.CDLL(None).pthread_exit(None)"
)


def wait_for_zombie_main_thread(p: psutil.Process) -> None:
    deadline = time.monotonic() + 30
    while p.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, p.status()
        time.sleep(0.01)
    assert p.num_threads() == 2  # the main thread, exited, and the sleeping one


def test_a_child_whose_main_thread_exited_runs_until_its_last_thread_is_gone():
    child = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS])
    try:
        p = psutil.Process(child.pid)
        wait_for_zombie_main_thread(p)
        assert _running(p)
        time.sleep(0.2)
        assert _running(p)

        assert _signal_and_wait([p], psutil.Process.kill, time.monotonic() + 10) == []
        # Gone means waitable, and it is left for its owner (multiprocessing) to reap.
        assert os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        assert child.poll() == -9
    finally:
        child.kill()
        child.wait(10)


def test_another_process_child_whose_main_thread_exited_runs_until_its_last_thread_is_gone():
    # The engine's worker is EngineCore's child, not ours: sh starts it and exits.
    started = subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -c '{MAIN_THREAD_EXITS}' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    p = psutil.Process(int(started.stdout))
    try:
        assert p.ppid() != os.getpid()
        wait_for_zombie_main_thread(p)
        assert _running(p)

        assert _signal_and_wait([p], psutil.Process.kill, time.monotonic() + 10) == []
        assert not _running(p)
    finally:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
