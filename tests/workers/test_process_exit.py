"""When a process is gone (workers/processes.py) and the waits built on it: Engine.shutdown,
the ranks' watch on each other, the launcher's clean-up. No engine needed.

A process is gone when its last thread is, not when its main thread is: under SIGKILL
the main thread of EngineCore can show as a zombie while another thread still unmaps its
memory; taking that for the end likely let vLLM's process manager, called right after,
find it alive and force-kill it once (#15). Here the main thread leaves with pthread_exit
while another thread sleeps, which holds that state for as long as the test needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from scripts import train
from trainer.ranks import PeerFailed, Ranks
from workers.engine import _signal_and_wait
from workers.processes import running

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


def start_orphan() -> psutil.Process:
    """Another process's child, as the engine's worker is EngineCore's: sh starts it and exits."""
    started = subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -c '{MAIN_THREAD_EXITS}' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    p = psutil.Process(int(started.stdout))
    assert p.ppid() != os.getpid()
    wait_for_zombie_main_thread(p)
    return p


@pytest.fixture
def orphan():
    p = start_orphan()
    yield p
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass


def test_a_child_whose_main_thread_exited_runs_until_its_last_thread_is_gone():
    child = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS])
    try:
        p = psutil.Process(child.pid)
        wait_for_zombie_main_thread(p)
        assert running(p)
        time.sleep(0.2)
        assert running(p)

        assert _signal_and_wait([p], psutil.Process.kill, time.monotonic() + 10) == []
        # Gone means waitable, and it is left for its owner (multiprocessing) to reap.
        assert os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        assert child.poll() == -9
    finally:
        child.kill()
        child.wait(10)


def test_another_process_child_whose_main_thread_exited_runs_until_its_last_thread_is_gone(orphan):
    assert running(orphan)

    assert _signal_and_wait([orphan], psutil.Process.kill, time.monotonic() + 10) == []
    assert not running(orphan)


def test_a_rank_whose_main_thread_exited_is_not_taken_for_a_failed_peer(orphan):
    ranks = Ranks(rank=0, world=2, _pids={0: os.getpid(), 1: orphan.pid})
    ranks.check_peers()  # no PeerFailed: a thread of rank 1 still runs

    orphan.kill()
    deadline = time.monotonic() + 10
    with pytest.raises(PeerFailed, match=f"rank 1 \\(pid {orphan.pid}\\) ended"):
        while time.monotonic() < deadline:
            ranks.check_peers()
            time.sleep(0.02)


def test_the_launcher_kills_a_group_member_whose_main_thread_exited():
    # The training process (sh, the group's leader) and one process of its group whose
    # main thread has exited: not gone, so the launcher must signal it.
    leader = subprocess.Popen(
        ["sh", "-c", f"'{sys.executable}' -c '{MAIN_THREAD_EXITS}' & echo $!; wait"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    member = psutil.Process(int(leader.stdout.readline()))
    try:
        wait_for_zombie_main_thread(member)
        assert train._kill_process_group(leader.pid) == [member.pid]
        assert not running(member)
    finally:
        leader.kill()
        leader.wait(10)
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
