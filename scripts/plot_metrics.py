"""Plot a run's metrics: RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.png.

    python scripts/plot_metrics.py runs/default
    python scripts/plot_metrics.py runs/default --out /tmp/run.png

Reward, loss, staleness and throughput against step (trainer/plots.py). Works on a run
that is still going: it plots the steps written so far. Exit code 2 when there is
nothing to plot.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot RUN_DIR/metrics.jsonl to RUN_DIR/metrics.png.")
    p.add_argument("run_dir", help="a run's output directory (run.output_dir)")
    p.add_argument("--out", help="image path (default: RUN_DIR/metrics.png)")
    args = p.parse_args(argv)

    from trainer.plots import plot_run

    try:
        path = plot_run(args.run_dir, args.out)
    except (OSError, ValueError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
