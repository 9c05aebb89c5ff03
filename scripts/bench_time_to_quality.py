"""Time to quality: held-out accuracy against wall time, for trainer variants and seeds.

    python scripts/bench_time_to_quality.py                         # default vs float32 trainer, seed 0
    python scripts/bench_time_to_quality.py --variants default sync_fp32 staleness2 --seeds 0 1 2
    python scripts/bench_time_to_quality.py --grid --seeds 0 1 2    # the issue's grid (hours here)
    python scripts/bench_time_to_quality.py --model tiny --steps 3  # a smoke run of the script
    python scripts/bench_time_to_quality.py --variants trl_fp32_malloc_kept --seeds 0 1 2 \
        --trl-steps 120 --trl-max-train-s 1510 1188 1070   # each TRL seed up to a training time

Each run is scripts/train.py (the real engines and trainer) on the default job (SmolLM2,
arithmetic, 4 prompts x 8 samples, 48 tokens) with eval.every=--eval-every and
eval.before_train: the held-out set is the arithmetic generator at eval.seed
(--eval-prompts prompts, --eval-samples samples each, temperature 1), accuracy is
eval/pass@1. Time is training wall time: perf/elapsed_s of each evaluation (since the
run began, engine start included) minus the evaluations' own perf/eval_s before it, so
the evaluation's cost is not counted against a variant that evaluates more often.

Prints and records (docs/benchmarks.md) per variant: s/step, training s/step, rows
trained per step and training tokens/s (a step skips the rows of groups without reward
spread, so training time alone confounds speed with learning), the time to reach 0.8 and
0.9 accuracy (median over seeds, min-max; "-" when a seed never got there), accuracy at
--budget-s seconds (the last evaluation at or before it) and at the end, each seed's
accuracies; and a PNG of accuracy against time (--png). One section and one PNG per
model, --steps and set of variants, so one comparison does not replace another.

Variants `trl`, `trl_fp32`, `trl_malloc_kept` and `trl_fp32_malloc_kept` are TRL's
GRPOTrainer on the same job (scripts/trl_job.py: the same prompts, reward, held-out set
and hyperparameters; bf16 autocast, float32, or either with glibc keeping the memory the
process frees, as the project's CPU trainer does), run in a virtual environment of its own, built at TRL_VENV
on first use and again whenever TRL_REQUIREMENTS changes (scripts/trl_requirements.txt:
every package pinned; torch from this machine's disk, the rest from PyPI): TRL is a
benchmark dependency, never a runtime one. A TRL variant trains --trl-steps steps (default
--steps), or until --trl-max-train-s of training time (one value, or one per seed: e.g.
twice the default's time to 0.9 on that seed, to test "2x sooner" without running TRL
for longer than that).

Every finished run is appended to docs/time_to_quality_runs.jsonl (its job, seed, commit,
machine, accuracy curve and speeds), so no run's numbers are lost with a log. With
--reuse, a run whose job is recorded there for this machine (processor, cores, native
bfloat16 or not) with the same settings (a changed default makes another job) is not
run again: the report takes the recorded one. With --deadline-s,
no run starts after that many seconds and the report covers the runs done or recorded
(the table's "seeds" column says which each variant has). Together they let the grid
(5-11 hours on a 2-core CPU) accumulate over several invocations:

    python scripts/bench_time_to_quality.py --grid --seeds 0 1 2 --steps 30 --eval-every 5 --reuse --deadline-s 4800
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import venv

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.benchlib import cpu_model, record, table  # noqa: E402
from trainer import metrics as M  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.models import default_cache_dir, resolve_model_path  # noqa: E402
from trainer.plots import read_metrics  # noqa: E402

VARIANTS = {
    "default": [],
    "trainer_fp32": ["trainer.dtype=float32"],
    "sync_fp32": ["algo.max_staleness=0", "engine.dtype=float32", "trainer.dtype=float32"],
    "staleness0": ["algo.max_staleness=0"],
    "staleness1": ["algo.max_staleness=1"],  # the default until 2026-12-07 (now "auto": 0 on CPU)
    "staleness2": ["algo.max_staleness=2"],
    "malloc_glibc": ["trainer.keep_freed_memory=false"],
    "no_dynamic_sampling": ["algo.filter_zero_std=false"],  # groups without reward spread batched (0.1 default)
    # decoupled PPO: the clip bounds the step's own change, the behaviour ratio only weighs
    "proximal_clip": ["algo.max_staleness=1", "algo.clip_against=proximal"],
    "proximal_clip_staleness0": ["algo.clip_against=proximal", "algo.max_staleness=0"],
    "staleness0_entropy": ["algo.max_staleness=0", "algo.entropy_coef=0.005"],  # against entropy collapse
    # against the late declines (README, Time to quality: neither stopped them): a decaying
    # learning rate, a KL leash to the initial policy
    "lr_cosine": ["algo.lr_schedule=cosine"],
    "kl_ref": ["algo.kl_coef=0.04"],
}
# TRL's GRPOTrainer on the same job (scripts/trl_job.py), its arguments per variant.
TRL_VARIANTS = {
    "trl": ["--dtype", "mixed"],
    "trl_fp32": ["--dtype", "float32"],
    "trl_malloc_kept": ["--dtype", "mixed", "--keep-freed-memory"],  # the allocator setting of ours
    # ... in float32, as trainer.dtype=auto trains on a CPU that emulates bfloat16 (AVX2 only)
    "trl_fp32_malloc_kept": ["--dtype", "float32", "--keep-freed-memory"],
}
TRL_VENV = default_cache_dir() / "bench-trl-venv"
TRL_REQUIREMENTS = REPO / "scripts" / "trl_requirements.txt"
THRESHOLDS = (0.8, 0.9)
RUNS = REPO / "docs" / "time_to_quality_runs.jsonl"  # every finished run, one JSON object a line
# The config sections that decide what a run of scripts/train.py learns and how fast
# (run.seed, run.steps, model.path and eval.* are in the job on their own).
LEARNING_SECTIONS = ("algo", "engine", "gen", "task", "reward", "trainer")


def trl_python() -> pathlib.Path:
    """The TRL venv's interpreter; the venv is (re)built first unless it was built from
    the current TRL_REQUIREMENTS (a copy of which it keeps) and imports trl."""
    python = TRL_VENV / "bin" / "python"
    built_from = TRL_VENV / "requirements.txt"
    wanted = TRL_REQUIREMENTS.read_text()
    current = built_from.exists() and built_from.read_text() == wanted
    if not current or subprocess.run([str(python), "-c", "import trl"], capture_output=True).returncode:
        print(f"building {TRL_VENV} from {TRL_REQUIREMENTS}", file=sys.stderr, flush=True)
        venv.create(TRL_VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(TRL_REQUIREMENTS)], check=True)
        built_from.write_text(wanted)
    return python


def grid() -> dict[str, list[str]]:
    """max_staleness 0/1/2 x engine bf16/float32 x trainer float32/mixed."""
    out = {}
    for s, e, t in itertools.product((0, 1, 2), ("bfloat16", "float32"), ("float32", "mixed")):
        out[f"s{s}_engine-{e}_trainer-{t}"] = [f"algo.max_staleness={s}", f"engine.dtype={e}", f"trainer.dtype={t}"]
    return out


def run_one(name: str, overrides: list[str], seed: int, args: argparse.Namespace, out_dir: pathlib.Path) -> dict:
    """One run of variant `name`: scripts/train.py with config overrides, or for a TRL
    variant scripts/trl_job.py in the TRL venv with these arguments."""
    if name in TRL_VARIANTS:
        cmd = [
            str(trl_python()), str(REPO / "scripts" / "trl_job.py"), "--model", str(resolve_model_path(args.model)),
            "--output-dir", str(out_dir), "--seed", str(seed), "--steps", str(args.trl_steps),
            "--eval-every", str(args.eval_every), "--eval-prompts", str(args.eval_prompts),
            "--eval-samples", str(args.eval_samples), *overrides,
            *(["--max-train-s", str(trl_max_train_s(args, seed))] if args.trl_max_train_s else []),
        ]
    else:
        cmd = [
            sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json", f"model.path={args.model}",
            f"run.output_dir={out_dir}", f"run.steps={args.steps}", f"run.seed={seed}", "run.checkpoint_every=1000",
            f"eval.every={args.eval_every}", "eval.before_train=true", f"eval.prompts={args.eval_prompts}",
            f"eval.samples={args.eval_samples}", *overrides,
        ]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
    evals = read_metrics(out_dir / "metrics.jsonl", evals=True)
    steps = read_metrics(out_dir / "metrics.jsonl")
    train_s = [s[M.PERF_TRAIN_S] for s in steps if s.get(M.PERF_TRAIN_S) is not None]  # TRL's: none
    rows = [s[M.PERF_TRAIN_ROWS] for s in steps if s.get(M.PERF_TRAIN_ROWS) is not None]
    rates = [s[M.PERF_TRAIN_TOKENS_PER_S] for s in steps if s.get(M.PERF_TRAIN_ROWS)]  # steps that trained
    curve, eval_s = [], 0.0
    for e in evals:
        eval_s += e[M.PERF_EVAL_S]
        curve.append((e[M.PERF_ELAPSED_S] - eval_s, e[M.EVAL_PASS_AT_1]))
    return {
        "seed": seed,
        "curve": curve,  # (training seconds, accuracy) at each evaluation
        "wall_s": time.monotonic() - t0,
        "step_s": statistics.median(s[M.PERF_STEP_S] for s in steps),
        "train_s": statistics.median(train_s) if train_s else None,
        "rows": statistics.fmean(rows) if rows else None,  # trained rows per step
        "tokens_per_s": statistics.median(rates) if rates else None,  # training speed, whatever the rows
        # What a late decline of accuracy looks like (README, Time to quality): the
        # policy's entropy per step (null: no token trained), pass@k per evaluation, and
        # per step the rows trained (8 per group with reward spread) and the gradient's
        # norm before clipping.
        "entropy": [s.get(M.LOSS_ENTROPY) for s in steps],
        "pass_at_k": [e.get(M.EVAL_PASS_AT_K) for e in evals],
        "step_rows": [s.get(M.PERF_TRAIN_ROWS) for s in steps],
        "grad_norm": [s.get(M.LOSS_GRAD_NORM) for s in steps],
    }


def job(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    """What makes two runs the same run: the job, the seed, the evaluation and the
    machine; for this project's trainer also the settings it trains with (`config`), so
    that a changed default makes "default" another job."""
    length = (
        {"steps": args.trl_steps, "max_train_s": trl_max_train_s(args, seed) if args.trl_max_train_s else None}
        if name in TRL_VARIANTS else {"steps": args.steps, "config": learning_config(overrides)}
    )
    return {
        "model": args.model, "variant": name, "overrides": overrides, "seed": seed, **length,
        "eval_every": args.eval_every, "eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
        "machine": machine(),
    }


def learning_config(overrides: list[str]) -> dict:
    """The settings of LEARNING_SECTIONS a run of scripts/train.py with these overrides
    trains with, flat ("algo.lr": 3e-05)."""
    sections = TrainerConfig.load(overrides=overrides).to_dict()
    return {f"{s}.{k}": v for s in LEARNING_SECTIONS for k, v in sections[s].items()}


def same_job(recorded: dict, wanted: dict) -> bool:
    """A recorded run is the wanted one if everything but the config is equal and each
    setting it recorded has the wanted value: a key added since (its default keeping the
    old behaviour) does not make it another run; a changed default does."""
    rest = lambda j: {k: v for k, v in j.items() if k != "config"}  # noqa: E731
    if rest(recorded) != rest(wanted) or ("config" in recorded) != ("config" in wanted):
        return False
    config = wanted.get("config", {})
    return all(k in config and config[k] == v for k, v in recorded.get("config", {}).items())


def machine() -> str:
    """The processor as far as it decides these runs' speed: its name ("AMD EPYC" names
    CPUs with and without bfloat16 alike), cores, and whether bfloat16 is native."""
    import torch

    from workers.hardware import bf16_native

    native = "native" if bf16_native(torch.device("cpu")) else "emulated"
    return f"{cpu_model()}, {os.cpu_count()} cores, bfloat16 {native}"


def recorded_runs() -> list[dict]:
    if not RUNS.exists():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]


def save_run(key: dict, result: dict) -> None:
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "?"
    # A change outside docs/ (where this file and the tables live) makes it another trainer.
    if git("diff", "--quiet", "HEAD", "--", ".", ":!docs").returncode:
        commit += "-dirty"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RUNS.open("a") as f:
        f.write(json.dumps({"job": key, "commit": commit, "date": when, **result}) + "\n")


def trl_max_train_s(args: argparse.Namespace, seed: int) -> float:
    limits = args.trl_max_train_s
    return limits[0] if len(limits) == 1 else limits[args.seeds.index(seed)]


def time_to(curve: list[tuple[float, float]], threshold: float) -> float | None:
    return next((t for t, acc in curve if acc >= threshold), None)


def at_budget(curve: list[tuple[float, float]], budget: float) -> float:
    return [acc for t, acc in curve if t <= budget][-1] if curve else float("nan")


def spread(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    missed = len(values) - len(got)
    text = f"{statistics.median(got):.0f}" if len(got) == 1 else f"{statistics.median(got):.0f} ({min(got):.0f}-{max(got):.0f})"
    return text + (f", {missed} never" if missed else "")


def median(runs: list[dict], field: str, fmt: str) -> str:
    """The median of a speed over the runs that have it ("-": none has; TRL's runs, or a run
    recorded from its stderr line, have only s/step)."""
    got = [r[field] for r in runs if r.get(field) is not None]
    return format(statistics.median(got), fmt) if got else "-"


def accuracy(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["default", "trainer_fp32"], choices=sorted([*VARIANTS, *TRL_VARIANTS, *grid()]),
                   help="variants in this order; the grid's names (e.g. s0_engine-float32_trainer-float32) too")
    p.add_argument("--grid", action="store_true", help="the issue's grid instead of --variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trl-steps", type=int, help="steps of the TRL variants (default: --steps)")
    p.add_argument("--trl-max-train-s", type=float, nargs="+",
                   help="a TRL run stops at the first step past this much training time (evaluated there); "
                        "one value, or one per seed")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--png", help="default: docs/time_to_quality_MODEL_STEPSsteps_VARIANTS.png")
    p.add_argument("--reuse", action="store_true",
                   help=f"take a run recorded in {os.path.relpath(RUNS, REPO)} for the same job, seed, evaluation "
                        "and machine instead of running it again")
    p.add_argument("--deadline-s", type=float,
                   help="start no run after this many seconds; report what ran or was recorded")
    args = p.parse_args()
    if args.trl_max_train_s and len(args.trl_max_train_s) not in (1, len(args.seeds)):
        p.error("--trl-max-train-s takes one value, or one per seed")
    trl_own_length = args.trl_steps is not None or args.trl_max_train_s is not None
    args.trl_steps = args.trl_steps or args.steps
    variants = grid() if args.grid else {v: {**VARIANTS, **TRL_VARIANTS, **grid()}[v] for v in args.variants}
    compared = "grid" if args.grid else "-".join(variants)
    # TRL's own length, where it differs: a section and PNG of their own.
    trl_length = ""
    if any(v in TRL_VARIANTS for v in variants) and trl_own_length:
        limit = "/".join(f"{s:.0f}" for s in args.trl_max_train_s or [])
        trl_length = f"TRL: {args.trl_steps} steps" + (f" or until {limit} s of training" if limit else "")
        compared += f"_trl-{args.trl_steps}steps" + (f"-{limit.replace('/', '-')}s" if limit else "")
    args.png = args.png or str(REPO / "docs" / f"time_to_quality_{args.model}_{args.steps}steps_{compared}.png")

    started = time.monotonic()
    recorded = recorded_runs() if args.reuse else []
    results: dict[str, list[dict]] = {}
    skipped = 0
    with tempfile.TemporaryDirectory(prefix="ttq-") as tmp:
        # Seeds outermost, variants alternating: a machine that slows down mid-benchmark
        # hits every variant alike (and a grid cut short by --deadline-s has every
        # variant's first seed before any variant's second).
        for seed in args.seeds:
            for name, overrides in variants.items():
                key = job(name, overrides, seed, args)
                r = next((rec for rec in reversed(recorded) if same_job(rec["job"], key)), None)
                if r is not None:
                    how = f"recorded {r['date']} at {r['commit']}"
                elif args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
                    skipped += 1
                    continue
                else:
                    r = run_one(name, overrides, seed, args, pathlib.Path(tmp) / f"{name}-{seed}")
                    save_run(key, r)
                    how = f"{r['wall_s']:.0f} s"
                results.setdefault(name, []).append(r)
                print(f"{name} seed {seed}: {how}, {r['step_s']:.1f} s/step, (training s, accuracy) "
                      f"{[(round(t), round(a, 2)) for t, a in r['curve']]}", file=sys.stderr, flush=True)
    if skipped:
        print(f"--deadline-s: {skipped} runs not started", file=sys.stderr, flush=True)
    if not results:
        sys.exit("no run done or recorded: nothing to report")

    rows = []
    for name, runs in results.items():
        curves = [r["curve"] for r in runs]
        rows.append([
            name, ("TRL GRPOTrainer " if name in TRL_VARIANTS else "") + (" ".join(variants[name]) or "(defaults)"),
            " ".join(str(r["seed"]) for r in runs), f"{statistics.median(r['step_s'] for r in runs):.1f}",
            median(runs, "train_s", ".1f"), median(runs, "rows", ".1f"), median(runs, "tokens_per_s", ".0f"),
            *(spread([time_to(c, th) for c in curves]) for th in THRESHOLDS),
            accuracy([at_budget(c, args.budget_s) for c in curves]), accuracy([c[0][1] for c in curves]),
            accuracy([c[-1][1] for c in curves]),
        ])
    header = ["variant", "overrides", "seeds", "s/step", "train s/step", "rows trained/step", "train tokens/s", *(f"s to {th}" for th in THRESHOLDS),
              f"acc at {args.budget_s:.0f} s", "acc at start", "acc at end"]
    body = (
        f"{machine()}; {args.model}, {args.steps} steps" + (f" ({trl_length})" if trl_length else "")
        + f", seeds {args.seeds}; held-out: {args.eval_prompts} arithmetic prompts "
        f"(eval.seed) x {args.eval_samples} samples, eval/pass@1 every {args.eval_every} steps; time: training "
        "wall time (evaluations excluded), engine start included; medians over seeds (min-max)\n\n"
        + table(header, rows)
    )
    body += "\n\nHeld-out accuracy at each evaluation, per seed:\n\n" + "\n".join(
        f"* {name}, seed {r['seed']}: {' '.join(f'{a:.2f}' for _, a in r['curve'])}"
        + (f" (recorded {r['date']} at {r['commit']})" if "commit" in r else "")
        for name, runs in results.items() for r in runs
    )
    if skipped:
        body += f"\n\n{skipped} runs of the {len(args.seeds) * len(variants)} asked for did not start (--deadline-s)."
    plot(results, args.png)
    body += f"\n\nAccuracy against time: `{os.path.relpath(args.png, REPO)}`."
    # One section per model, length and comparison: a longer run, or another set of
    # variants, does not replace what an earlier one recorded.
    record(f"Time to quality ({args.model}, {args.steps} steps, {compared})", body)


def plot(results: dict[str, list[dict]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i % 10}"
        for j, r in enumerate(runs):
            ts, accs = zip(*r["curve"])
            ax.plot(ts, accs, marker="o", color=color, alpha=0.8, label=name if j == 0 else None)
    for th in THRESHOLDS:
        ax.axhline(th, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall time (s), evaluations excluded")
    ax.set_ylabel("held-out eval/pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


if __name__ == "__main__":
    main()
