"""How fast a dead or stuck engine ends a run: each fault scenario N times.

    python scripts/bench_failure.py [--runs 5] [--scenarios kill_mid_generation ...]

Each run is the real `scripts/train.py` with the tiny model and a real vLLM engine on
CPU; EngineCore gets SIGKILL (or SIGSTOP, the hang case, engine.hang_timeout_s=3) at
the scenario's moment. Reported: detection latency (signal to the `worker_failed`
event), signal-to-exit latency, the exit codes and final events seen, and processes
of the run left alive. Targets: detection < 0.5 s (hang: the timeout + 0.5 s), exit < 5 s
after detection, no leftovers, every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from scripts.benchlib import record, table  # noqa: E402
from tests.faults import SCENARIOS, inject  # noqa: E402
from trainer.models import resolve_model_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = p.parse_args()
    model = resolve_model_path("tiny")
    rows = []
    for scenario in args.scenarios:
        detect, exits, outcomes, leftovers = [], [], [], 0
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    r = inject(scenario, Path(tmp), model)
                except Exception as e:  # a run that did not exit in time is a result too
                    outcomes.append(f"error:{type(e).__name__}")
                    continue
            if r.detect_s is not None:
                detect.append(r.detect_s)
            exits.append(r.exit_s)
            outcomes.append(f"{r.returncode}/{r.last.get('error_type')}")
            leftovers += len(r.leftover_pids)
            print(f"{scenario} run {i}: rc={r.returncode} detect={r.detect_s} exit={r.exit_s:.2f}", flush=True)
        ok = sum(o.startswith("1/") for o in outcomes)
        rows.append([
            scenario,
            f"{statistics.median(detect):.3f} / {max(detect):.3f}" if detect else "-",
            f"{statistics.median(exits):.2f} / {max(exits):.2f}" if exits else "-",
            ", ".join(sorted(set(outcomes))),
            leftovers,
            f"{ok}/{args.runs}",
        ])
    record(
        "bench_failure",
        table(
            ["scenario", "detection s (median / max)", "signal to exit s (median / max)",
             "exit code / error", "leftover processes", "runs exiting 1"],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
