"""Throughput of the rollout queue: acquire + put + get + retire cycles per second.

    python scripts/bench_capacity.py [--seconds 2] [--groups-per-step 8] [--max-staleness 1]

Producers loop `acquire -> put`; one consumer loops `get_batch(groups_per_step) ->
retire`. One cycle is one group through all four. Beside it, the same loop over a
plain Condition-based queue (notify_all on every change), to show what waking only
the threads that can proceed buys. The trainer needs a few hundred cycles/s.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capacity import QueueClosed, RolloutQueue  # noqa: E402
from scripts.benchlib import record, table  # noqa: E402


class ConditionQueue:
    """Baseline: one Condition guards permits and queue; every change wakes everyone."""

    def __init__(self, max_staleness: int, groups_per_step: int):
        self.free = (max_staleness + 1) * groups_per_step
        self.items = collections.deque()
        self.cond = threading.Condition()
        self.closed = False

    def acquire(self, timeout=None):
        with self.cond:
            if not self.cond.wait_for(lambda: self.free > 0 or self.closed, timeout):
                return None
            if self.closed:
                raise QueueClosed()
            self.free -= 1
            return self

    def put(self, item):
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def get_batch(self, n, timeout=None):
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            return [self.items.popleft() for _ in range(n)]

    def retire(self, n):
        with self.cond:
            self.free += n
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def run(queue, producers: int, groups_per_step: int, seconds: float) -> float:
    stop = threading.Event()

    def produce():
        try:
            while not stop.is_set():
                slot = queue.acquire(timeout=0.1)
                if slot is not None:
                    slot.put(1)
        except QueueClosed:
            pass

    threads = [threading.Thread(target=produce, daemon=True) for _ in range(producers)]
    for t in threads:
        t.start()
    cycles = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        queue.get_batch(groups_per_step, timeout=10)
        queue.retire(groups_per_step)
        cycles += groups_per_step
    elapsed = time.perf_counter() - t0
    stop.set()
    queue.close()
    for t in threads:
        t.join(5)
    return cycles / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    rows = []
    for n in args.threads:
        ours = run(RolloutQueue(args.max_staleness, args.groups_per_step), n, args.groups_per_step, args.seconds)
        base = run(ConditionQueue(args.max_staleness, args.groups_per_step), n, args.groups_per_step, args.seconds)
        rows.append([n, f"{ours:,.0f}", f"{base:,.0f}", f"{ours / base:.2f}"])
        print(rows[-1], flush=True)
    record(
        "bench_capacity",
        f"groups_per_step={args.groups_per_step} max_staleness={args.max_staleness} seconds={args.seconds}\n\n"
        + table(["producers", "RolloutQueue cycles/s", "Condition baseline cycles/s", "ratio"], rows),
    )


if __name__ == "__main__":
    main()
