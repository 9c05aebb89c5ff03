"""What asynchrony buys: step time against max_staleness, in simulation and for real.

    python scripts/bench_overlap.py [--steps 30] [--train-s 0.1] [--ratios 0.5 1 2]
    python scripts/bench_overlap.py --real [--model smollm2] [--steps 5] [--staleness 0 1]

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

--real: scripts/train.py itself (real engine, real training) on the default job, once
per max_staleness and per core layout: "shared" (as a user runs it: the engine's and the
trainer's threads on every core) and "pinned" (once the engine has started, its
processes on --engine-cores and the training process on --trainer-cores, by CPU
affinity, each with one OpenMP/torch thread): each side has
its own core, as the engine and the trainer have their own devices on a GPU node, and
overlap can show what it buys. Step time is the median perf/step_s after step 0 (which
has nothing to overlap); the cores each side's busiest thread ran on are read from
/proc, not assumed. Step time also depends on how many rows train (rows of groups without
reward spread are skipped), so the reward column says how alike the runs learned.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import statistics
import sys
import tempfile
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


def busiest_cores(pid: int) -> str:
    """The CPUs that the process's busiest thread (most CPU time so far) may run on,
    e.g. "0": where its compute ran (from /proc)."""
    best, cores = -1, set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpu_time = int(fields[11]) + int(fields[12])  # utime + stime
            if cpu_time > best:
                best, cores = cpu_time, os.sched_getaffinity(int(task.name))
        except (OSError, IndexError):
            pass
    return ",".join(map(str, sorted(cores)))


def pin(pid: int, cores: set) -> None:
    """Every thread of the process onto `cores`; threads it starts later inherit it."""
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, FileNotFoundError):
            pass


def real_run(model: str, max_staleness: int, steps: int, engine_cores: set | None, trainer_cores: set | None) -> dict:
    """scripts/train.py on the default job; with cores given, once the engine has started
    its processes are pinned to engine_cores and the training process to trainer_cores,
    each side with one OpenMP/torch thread (OMP_NUM_THREADS=1)."""
    from tests.faults import Run, is_event
    from trainer import metrics as M
    from trainer.models import resolve_model_path

    env = {"OMP_NUM_THREADS": "1"} if engine_cores else {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(pathlib.Path(tmp), resolve_model_path(model), f"run.steps={steps}", "log.level=INFO",
                  f"algo.max_staleness={max_staleness}", env=env, small=False)
        try:
            child = run.first(is_event("training_process_started"), timeout=600)["pid"]
            # Pinned once the engine exists: its processes, spawned by the training
            # process, would otherwise inherit the trainer's cores (and vLLM's own
            # VLLM_CPU_OMP_THREADS_BIND did not move its threads out of them here).
            engines = run.first(is_event("worker_started"), timeout=600)["engine_pids"]
            if engine_cores:
                for pid in engines:
                    pin(pid, engine_cores)
                pin(child, trainer_cores)
            run.first(lambda e: e.get("event") == "train_step" and e.get("step") == min(1, steps - 1), timeout=900)
            placed = {"trainer": busiest_cores(child), "engine": busiest_cores(engines[0])}
            rc = run.finish(timeout=300 + 120 * steps)
            assert rc == 0, f"exit code {rc}; last events: {run.events[-3:]}"
        finally:
            if run.proc.poll() is None:
                run.finish(timeout=1)
    later = [e for e in run.events if e.get("event") == "train_step"][1:]
    return {
        **placed,
        "step_s": statistics.median(e[M.PERF_STEP_S] for e in later),
        "train_s": statistics.median(e[M.PERF_TRAIN_S] for e in later),
        "idle": statistics.median(e[M.PERF_TRAINER_IDLE_FRAC] for e in later),
        "reward": statistics.fmean(e[M.REWARD_MEAN] for e in later),
        "staleness": max(e[M.STALENESS_MAX] for e in later),
    }


def cores(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


def real(args) -> None:
    rows = []
    for layout in args.layouts:
        base = None
        for k in args.staleness:
            pinned = layout == "pinned"
            r = real_run(args.model, k, args.steps, cores(args.engine_cores) if pinned else None,
                         cores(args.trainer_cores) if pinned else None)
            base = r["step_s"] if base is None else base
            rows.append([
                layout, r["engine"], r["trainer"], k, f"{r['step_s']:.1f}", f"{base / r['step_s']:.2f}x",
                f"{r['train_s']:.1f}", f"{r['idle']:.2f}", f"{r['reward']:.2f}", r["staleness"],
            ])
            print(rows[-1], flush=True)
    record(
        "bench_overlap_real",
        f"scripts/train.py, model {args.model}, the default job, {args.steps} steps; medians of the steps after "
        "step 0; speed-up against the layout's first max_staleness\n\n"
        + table(
            ["layout", "engine cores", "trainer cores", "max_staleness", "step s", "speed-up",
             "train s", "trainer idle frac", "reward mean", "max staleness seen"],
            rows,
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", action="store_true", help="the real scripts/train.py instead of the simulation")
    p.add_argument("--model", default="smollm2", help="--real: the model")
    p.add_argument("--layouts", nargs="+", default=["pinned", "shared"], choices=["pinned", "shared"])
    p.add_argument("--engine-cores", default="0", help="--real, pinned: the engine processes' CPUs, e.g. 0")
    p.add_argument("--trainer-cores", default="1", help="--real, pinned: the training process's CPUs, e.g. 1")
    p.add_argument("--steps", type=int, default=None, help="default: 30; --real: 5")
    p.add_argument("--train-s", type=float, default=0.1)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="generation/training time")
    p.add_argument("--staleness", type=int, nargs="+", default=None, help="default: 0-4; --real: 0 1")
    args = p.parse_args()
    if args.real:
        args.staleness, args.steps = args.staleness or [0, 1], args.steps or 5
        return real(args)
    args.staleness, args.steps = args.staleness or [0, 1, 2, 3, 4], args.steps or 30
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
