"""How fast a run starts and ends: the real scripts/train.py, timed from its JSON log.

    python scripts/bench_startup.py [--models tiny smollm2] [--runs 3] [--steps 3]

For each model, `--runs` normal runs of `--steps` steps (the default job otherwise:
arithmetic, 4 prompts x 8 samples, 48 tokens) and `--runs` runs whose EngineCore gets
SIGKILL just after the first step. Each row is the median over its runs (the kill
runs count for the first two columns too):

* start to engines ready: the launcher started -> the `engines_ready` event
* start to first step: -> the first `train_step` event; beside it the engines-ready time
  plus one step (the median `perf/step_s` of the later steps), the goal, and how long
  the first step waited for its batch (its idle fraction times its length: the first
  batch's generation, which nothing overlaps). Later steps train fewer rows when some
  groups have no reward spread, so the goal can be below a step that trains them all.
* last step to exit: the last `train_step` event -> the launcher exited (the final
  checkpoint, RUN_DIR/model, the plot, the engines' shutdown, the processes' teardown);
  beside it, the final checkpoint's own write (its `checkpoint_saved` seconds: model and
  optimizer state, fsynced), which the disk's speed bounds
* SIGKILL of EngineCore to exit: the signal -> the launcher exited (exit code 1)

Goals (issue #15): last step to exit under 2 s; SIGKILL to exit under 3 s; first step
no later than engine start plus one step.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from scripts.benchlib import record, table  # noqa: E402
from tests.faults import Run, event_time, is_event  # noqa: E402
from tests.helpers import alive  # noqa: E402
from trainer import metrics as M  # noqa: E402
from trainer.models import resolve_model_path  # noqa: E402


def one_run(model: str, steps: int, kill: bool) -> dict:
    """One run's timings, seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.steps={steps if not kill else 50}", "log.level=INFO"]
        run = Run(Path(tmp), resolve_model_path(model), *overrides, small=False)
        try:
            ready = run.first(is_event("engines_ready"), timeout=600)
            engine_pids = run.first(is_event("worker_started"), timeout=600)["engine_pids"]
            first = run.first(is_event("train_step"), timeout=600)
            out = {"ready": event_time(ready) - run.started_at, "first": event_time(first) - run.started_at,
                   "first_wait": first[M.PERF_TRAINER_IDLE_FRAC] * first[M.PERF_STEP_S]}
            if kill:
                killed = time.time()
                os.kill(engine_pids[0], signal.SIGKILL)
                rc = run.finish(timeout=60)
                out["kill_exit"] = run.exited_at - killed
                assert rc == 1, f"exit code {rc} after SIGKILL of EngineCore"
            else:
                rc = run.finish(timeout=600)
                assert rc == 0, f"exit code {rc}; last events: {run.events[-3:]}"
                step_events = [e for e in run.events if e.get("event") == "train_step"]
                out["exit"] = run.exited_at - event_time(step_events[-1])
                out["step"] = statistics.median(e[M.PERF_STEP_S] for e in step_events[1:])
                out["checkpoint"] = [e for e in run.events if e.get("event") == "checkpoint_saved"][-1]["seconds"]
            time.sleep(0.2)
            assert not alive(engine_pids), f"engine processes {alive(engine_pids)} outlived the run"
            return out
        finally:
            if run.proc.poll() is None:
                run.finish(timeout=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps of a normal run (>= 2)")
    args = p.parse_args()
    rows = []
    for model in args.models:
        results = []
        for i in range(args.runs):
            for kill in (False, True):
                r = one_run(model, args.steps, kill)
                print(f"{model} run {i} {'kill' if kill else 'normal'}: "
                      + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
                results.append(r)

        def med(key: str) -> float:
            return statistics.median(r[key] for r in results if key in r)

        rows.append([
            model, f"{med('ready'):.1f}", f"{med('first'):.1f}", f"{med('ready') + med('step'):.1f}",
            f"{med('first_wait'):.1f}",
            f"{med('step'):.1f}", f"{med('exit'):.2f}", f"{med('checkpoint'):.2f}", f"{med('kill_exit'):.2f}",
        ])
    record(
        "bench_startup",
        f"medians of {args.runs} normal runs ({args.steps} steps) and {args.runs} runs killed after "
        "the first step; the default job otherwise\n\n"
        + table(
            ["model", "start to engines ready s", "start to first step s", "goal: ready + one step s",
             "first step waiting for its batch s",
             "step s (median)", "last step to exit s", "of it, the final checkpoint s",
             "SIGKILL of EngineCore to exit s"],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
