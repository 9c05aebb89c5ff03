"""A run's metrics against step, as one PNG: RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.png.

    from trainer.plots import plot_run
    plot_run("runs/default")        # -> PosixPath('runs/default/metrics.png')

The trainer calls it at the end of a run; `scripts/plot_metrics.py RUN_DIR` does the same
for any run directory, finished or not. Four panels: reward, loss, staleness and
throughput; a fifth, held-out evaluation, when the run evaluated (eval.every). matplotlib's object API with the Agg canvas: no pyplot state, no display
needed, safe beside a notebook's own backend.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

from trainer import metrics as M

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
FIGSIZE_IN = (12.0, 8.0)
DPI = 100  # -> a 1200 x 800 pixel image

# (panel title, y label, [(metric, line label)], second y label, second axis [(metric, label)])
PANELS: list[tuple[str, str, list[tuple[str, str]], str, list[tuple[str, str]]]] = [
    (
        "Reward",
        "reward",
        [(M.REWARD_MEAN, "mean"), (M.REWARD_STD, "std")],
        "fraction",
        [(M.REWARD_FRAC_ZERO_STD_GROUPS, "groups with zero std (frac)")],
    ),
    (
        "Loss",
        "policy loss",
        [(M.LOSS_POLICY, "policy")],
        "fraction of tokens",
        [(M.LOSS_CLIP_FRAC, "clip frac"), (M.LOSS_IS_CAPPED_FRAC, "IS capped frac")],
    ),
    (
        "Staleness (policy versions)",
        "versions",
        [(M.STALENESS_MEAN, "mean"), (M.STALENESS_MAX, "max")],
        "",
        [],
    ),
    (
        "Throughput",
        "generated tokens / s",
        [(M.PERF_GEN_TOKENS_PER_S, "tokens/s")],
        "seconds",
        [(M.PERF_STEP_S, "step s"), (M.PERF_WEIGHT_SYNC_S, "weight sync s")],
    ),
]
# The evaluation panel, drawn from the eval records (x: steps done when it ran).
EVAL_PANEL = (
    "Held-out evaluation",
    "fraction",
    [(M.EVAL_PASS_AT_1, "pass@1"), (M.EVAL_PASS_AT_K, "pass@k"), (M.EVAL_REWARD_MEAN, "reward mean")],
    "",
    [],
)


def read_metrics(path: str | os.PathLike, evals: bool = False) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl (with evals=True: its eval records), in step
    order, the last record of a step winning (a resumed run may have written a step
    twice). Unparsable lines (a run killed mid-write) are skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record[M.STEP])
        except (ValueError, KeyError, TypeError):
            continue
        if M.is_eval_record(record) == evals:
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def preload() -> None:
    """Import matplotlib (about 1 s here) ahead of the end of a run, where plot_run
    would otherwise pay it on the way out. Never raises: a broken or missing
    matplotlib is reported by plot_run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Render RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/metrics.png); returns the
    path. Raises FileNotFoundError without a metrics file, ValueError if it holds no
    step record. A metric missing from a record (an older run) leaves a gap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = pathlib.Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE}: no step records to plot")
    evals = read_metrics(run_dir / METRICS_FILE, evals=True)
    out = pathlib.Path(out) if out is not None else run_dir / PLOT_FILE

    def series(name: str, rows: list[dict[str, Any]]) -> list[float]:
        values = []
        for r in rows:
            v = r.get(name)
            values.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
        return values

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    panels = [(p, records) for p in PANELS] + ([(EVAL_PANEL, evals)] if evals else [])
    axes = fig.subplots(len(panels) // 2 + len(panels) % 2, 2, sharex=True, squeeze=False)
    if len(panels) % 2:
        axes[-1, -1].set_visible(False)
    for ax, ((title, ylabel, left, right_label, right), rows) in zip(axes.flat, panels):
        steps = [r[M.STEP] for r in rows]
        marker = "o" if len(steps) <= 30 else None
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        handles = [ax.plot(steps, series(name, rows), marker=marker, label=label)[0] for name, label in left]
        if right:
            twin = ax.twinx()
            twin.set_ylabel(right_label)
            colors = ["tab:red", "tab:purple", "tab:brown"]
            handles += [
                twin.plot(steps, series(name, rows), marker=marker, linestyle="--", color=c, label=label)[0]
                for (name, label), c in zip(right, colors)
            ]
        ax.legend(handles=handles, loc="best", fontsize="small")
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {len(records)} steps" + (f", {len(evals)} evaluations" if evals else ""))
    # Fixed margins, not tight_layout: that lays the figure out by drawing it once more
    # (0.41 s against 0.30 s here), and a run ends with it beside the final checkpoint.
    fig.subplots_adjust(left=0.07, right=0.92, bottom=0.06, top=0.92, wspace=0.34, hspace=0.28)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")  # bbox_inches stays off: the size is FIGSIZE_IN * DPI
    os.replace(tmp, out)  # a reader never sees a half-written image
    return out
