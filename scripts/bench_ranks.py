"""Training across ranks on CPU: step time, memory per rank, and how fast a dead rank
ends the run.

    python scripts/bench_ranks.py [--steps 8] [--runs 2]

For 1 and 2 trainer ranks (gloo, FSDP2 shards), the real `scripts/train.py` with the tiny
model and one real vLLM engine. Reported per rank count: the median step time and train
time over the steps after the first; each rank's policy shard (from its `setup` event)
and its peak RSS (sampled every 0.1 s; most of it is torch, transformers and vLLM
themselves); and, over --runs runs, the time from SIGKILL of a rank in the middle of a
step (one rank: the training process) to the launcher's exit, with the final event.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import psutil  # noqa: E402

from scripts.benchlib import record, table  # noqa: E402
from tests.faults import Run, is_event  # noqa: E402
from trainer.models import resolve_model_path  # noqa: E402

COMMON = ("algo.max_staleness=1", "gen.max_tokens=32", "engine.max_model_len=256", "engine.dtype=float32")


def rank_processes(launcher: int) -> dict[int, psutil.Process]:
    """rank -> process: the ranks (their RANK variable), or the one training process."""
    ranks, training = {}, None
    try:
        children = psutil.Process(launcher).children(recursive=True)
    except psutil.Error:
        return {}
    for p in children:
        try:
            rank = p.environ().get("RANK")
            if rank is not None and "RANK" not in p.parent().environ():  # a rank, not its engine
                ranks[int(rank)] = p
            elif p.ppid() == launcher:
                training = p
        except psutil.Error:
            pass
    return ranks or ({0: training} if training else {})


def sample_rss(launcher: int, peak: dict[int, int], stop: threading.Event) -> None:
    while not stop.wait(0.1):
        for rank, p in rank_processes(launcher).items():
            try:
                peak[rank] = max(peak.get(rank, 0), p.memory_info().rss)
            except psutil.Error:
                pass


def steady_run(model, ranks: int, steps: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), model, *COMMON, f"trainer.ranks={ranks}", f"run.steps={steps}")
        peak, stop = {}, threading.Event()
        threading.Thread(target=sample_rss, args=(run.proc.pid, peak, stop), daemon=True).start()
        try:
            rc = run.finish(timeout=900)
        finally:
            stop.set()
    if rc != 0:
        raise RuntimeError(f"{ranks} ranks: exit {rc}: {run.events[-2:]}")
    train_steps = [e for e in run.events if e["event"] == "train_step"][1:]
    shards = {e.get("rank", 0): e["policy_shard_mib"] for e in run.events if e["event"] == "setup"}
    per_rank = " / ".join(f"{shards[r]:.0f}" for r in sorted(shards))
    rss = " / ".join(f"{peak[r] / 2**20:.0f}" for r in sorted(peak))
    return [
        ranks,
        f"{statistics.median(e['perf/step_s'] for e in train_steps):.2f}",
        f"{statistics.median(e['perf/train_s'] for e in train_steps):.2f}",
        per_rank,
        rss,
    ]


def kill_run(model, ranks: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), model, *COMMON, f"trainer.ranks={ranks}")
        run.wait_for(is_event("phase", phase="train"), timeout=600)
        victim = rank_processes(run.proc.pid)[ranks - 1]  # rank 1, or the training process
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        rc = run.finish(timeout=120)
        exit_s = time.monotonic() - killed
    last = run.events[-1]
    return exit_s, f"{rc}/{last.get('event')}/{last.get('error_type')}/rank {last.get('rank', 0)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    model = resolve_model_path("tiny")
    rows = []
    for ranks in (1, 2):
        row = steady_run(model, ranks, args.steps)
        kills = [kill_run(model, ranks) for _ in range(args.runs)]
        exits = [k[0] for k in kills]
        row += [f"{statistics.median(exits):.2f} / {max(exits):.2f}", ", ".join(sorted({k[1] for k in kills}))]
        print(row, flush=True)
        rows.append(row)
    record(
        "bench_ranks",
        table(
            ["ranks", "step s (median)", "train s (median)", "policy shard MiB per rank", "peak RSS MiB per rank",
             "rank SIGKILL to launcher exit s (median / max)", "exit / last event / error / rank"],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
