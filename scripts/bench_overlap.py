"""What asynchrony buys: step time against max_staleness, in simulation.

    python scripts/bench_overlap.py [--steps 30] [--train-s 0.1] [--ratios 0.5 1 2]

The engines and the training step are replaced by calibrated sleeps; everything else is
the real thing: the RolloutQueue, GenerationWorker threads, the Supervisor (watchdog,
weight broadcast) and the main loop's calls (get_batch with a health check ->
train -> broadcast_weights -> retire). Each group's generation time is long-tailed
(lognormal, sigma 0.5) with mean `ratio * train_s`; a simulated engine runs any number
of groups at once, like a GPU with spare batch room. A synchronous trainer
(max_staleness=0) alternates generating a batch (which waits for its slowest group:
about 1.8x the mean for 8 groups) and training on it; an asynchronous one overlaps the
two, so its step time tends to the longer of the two alone. Reported per setting: step
time relative to the synchronous run, the trainer's idle fraction (waiting for a
batch), and the largest staleness seen, which must never exceed the bound.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capacity import RolloutQueue  # noqa: E402
from scripts.benchlib import quiet, record, table  # noqa: E402
from tests.fake_engine import FakeEngine  # noqa: E402
from workers.rewards import RewardFunction, RewardPool, RewardSpec  # noqa: E402
from workers.supervisor import Supervisor  # noqa: E402
from workers.worker import GenerationWorker, PromptItem, SamplingSpec  # noqa: E402


def sim_engine(mean_s: float, seed: int) -> FakeEngine:
    """The fake engine with lognormal group generation times of the given mean
    (mu = ln(mean) - sigma^2 / 2, sigma 0.5), stepping every 2 ms."""
    rng = random.Random(seed)
    return FakeEngine(step_s=0.002, duration=lambda: rng.lognormvariate(math.log(mean_s) - 0.125, 0.5))


class Prompts:
    def __init__(self):
        self.lock = threading.Lock()
        self.i = 0

    def next(self):
        with self.lock:
            self.i += 1
            return PromptItem(self.i, [1, 2, 3], None)


def simulate(max_staleness: int, gen_mean_s: float, train_s: float, steps: int, groups_per_step: int, seed: int):
    queue = RolloutQueue(max_staleness, groups_per_step)
    prompts = Prompts()
    rewards = RewardPool(RewardSpec([RewardFunction("coin", lambda text, prompt: float(random.random() < 0.5))])).start()

    def make_worker(i, on_error, start_gate):
        return GenerationWorker(
            i,
            build_engine=lambda: sim_engine(gen_mean_s, seed + i),
            queue=queue,
            prompts=prompts,
            sampling=SamplingSpec(group_size=2, max_tokens=2, seed=seed),
            rewards=rewards,
            max_groups_in_flight=queue.permits,
            on_error=on_error,
            start_gate=start_gate,
            poll_s=0.002,
        )

    sup = Supervisor(queue, make_worker, count=1, hang_timeout_s=60)
    sup.start()
    sup.wait_ready(30)
    waits, staleness = [], []
    t0 = time.monotonic()
    try:
        for _ in range(steps):
            w0 = time.monotonic()
            groups = queue.get_batch(groups_per_step, timeout=60, health_check=sup.check)
            waits.append(time.monotonic() - w0)
            staleness += [queue.version - g.start_version for g in groups]
            time.sleep(train_s)  # the training step
            sup.broadcast_weights(b"", queue.version + 1, timeout=10)
            queue.retire(groups_per_step)
    finally:
        sup.shutdown(5)
        rewards.shutdown()
    total = time.monotonic() - t0
    return total / steps, sum(waits) / total, max(staleness)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--train-s", type=float, default=0.1)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="generation/training time")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args()
    quiet()
    rows = []
    for ratio in args.ratios:
        base = None
        for k in args.staleness:
            step_s, idle, stale = simulate(k, ratio * args.train_s, args.train_s, args.steps, args.groups_per_step, seed=k)
            base = step_s if k == 0 else base
            speedup = f"{base / step_s:.2f}x" if base else "-"
            ok = "yes" if stale <= k else "NO"
            rows.append([ratio, k, f"{step_s * 1000:.0f}", speedup, f"{idle:.2f}", stale, ok])
            print(rows[-1], flush=True)
    record(
        "bench_overlap",
        f"train_s={args.train_s}, groups_per_step={args.groups_per_step}, steps={args.steps}, "
        "generation time per group lognormal(sigma=0.5) with mean ratio*train_s\n\n"
        + table(
            ["gen/train ratio", "max_staleness", "step ms", "speed-up vs sync", "trainer idle frac",
             "max staleness seen", "within bound"],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
