"""What a training step costs in a fresh process, with glibc's allocator defaults and as
the trainer sets a CPU process up (freed memory kept, AdamW's state allocated first).

    python scripts/bench_cold_step.py [--model smollm2] [--dtype mixed] [--steps 8] [--rounds 2]

The trainer's own pieces, no engine: the policy loaded as the trainer loads it
(trainer.models.load_model), AdamW as the trainer builds it, `token_logprobs` and a
loss-shaped sum over completion tokens, `--steps` steps of `--rows` rows (30 prompt
tokens, completions of 30-47 tokens, then 10-29, alternating in pairs: micro-batches of
two shapes, as a run has). Each setting runs in `--rounds` fresh processes, the settings
alternating; the table has the median over rounds of each step's forward + backward and
AdamW seconds, and the total of both over the steps after the first two (the warm ones):

* "glibc": malloc's defaults (every block over 32 MB mapped on its own and unmapped when
  freed), AdamW's state made by its first step: what the trainer did before.
* "trainer": workers.hardware.keep_freed_memory (trainer.keep_freed_memory, the
  default) and trainer.policy.warm_up_optimizer before the first step.

The first rows show what the first step of a run pays that later ones do not (issue
#15: first step no later than engines ready + one step); the total shows what keeping
freed memory does to every step (issue #17: train at the hardware's speed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.benchlib import cpu_model, quiet, record, table  # noqa: E402

SETTINGS = ("glibc", "trainer")


def steps(args) -> dict:
    """One fresh process: the steps' timings, as JSON on stdout."""
    quiet()
    import torch

    from trainer.models import load_model, resolve_model_path
    from trainer.policy import TokenBatch, resolve_dtype, token_logprobs, warm_up_optimizer
    from workers.hardware import keep_freed_memory

    trainer_like = args.setting == "trainer"
    if trainer_like and not keep_freed_memory():
        sys.exit("keep_freed_memory: not glibc")
    device = torch.device("cpu")
    dtype, autocast = resolve_dtype(args.dtype, device)
    t = time.perf_counter()
    model = load_model(resolve_model_path(args.model), device, dtype).train()
    out = {"load_s": time.perf_counter() - t, "warm_up_s": None, "shapes": [], "fwd_bwd_s": [], "adamw_s": []}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if trainer_like:
        t = time.perf_counter()
        warm_up_optimizer(optimizer)
        out["warm_up_s"] = time.perf_counter() - t
    rng = random.Random(0)
    for step in range(args.steps):
        lo, hi = (30, 48) if step % 4 < 2 else (10, 30)
        prompts = [[rng.randrange(100, 40000) for _ in range(30)] for _ in range(args.rows)]
        completions = [[rng.randrange(100, 40000) for _ in range(rng.randrange(lo, hi))] for _ in range(args.rows)]
        batch = TokenBatch.build(prompts, completions, [[0.0] * len(c) for c in completions], 0, device)
        t0 = time.perf_counter()
        logprobs, _ = token_logprobs(model, batch, 1.0, autocast=autocast)
        (logprobs * batch.completion_mask).sum().backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        out["shapes"].append(f"{args.rows} x {batch.input_ids.shape[1]}")
        out["fwd_bwd_s"].append(t1 - t0)
        out["adamw_s"].append(t2 - t1)
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="mixed", help="trainer.dtype: mixed or float32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=16, help="rows per step (algo.micro_batch_size's default)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per setting, alternating")
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # a child: one process, one setting
    args = p.parse_args()
    if args.setting:
        print(json.dumps(steps(args)))
        return
    runs = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for s in SETTINGS:
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--setting", s]
            proc = subprocess.run(child, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                sys.exit(f"{s}, round {r}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            runs[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{s}, round {r}: forward+backward s {[round(v, 2) for v in runs[s][-1]['fwd_bwd_s']]}", flush=True)

    def med(s: str, key: str, i: int) -> float:
        return statistics.median(run[key][i] for run in runs[s])

    rows = [
        [i, runs["glibc"][0]["shapes"][i], *(f"{med(s, k, i):.2f}" for s in SETTINGS for k in ("fwd_bwd_s", "adamw_s"))]
        for i in range(args.steps)
    ]
    warm = {s: statistics.median(sum(run["fwd_bwd_s"][2:]) + sum(run["adamw_s"][2:]) for run in runs[s]) for s in SETTINGS}
    rows.append([f"steps 2-{args.steps - 1}, all s", "", f"{warm['glibc']:.1f}", "", f"{warm['trainer']:.1f}",
                 f"({warm['glibc'] / warm['trainer']:.2f}x)"])
    warm_up = statistics.median(run["warm_up_s"] for run in runs["trainer"])
    cpu = cpu_model()
    body = (
        f"{args.model}, trainer.dtype={args.dtype}, {cpu}, {runs['glibc'][0]['threads']} torch threads; medians of "
        f"{args.rounds} fresh processes per setting, alternating; warm_up_optimizer took {warm_up:.1f} s before step 0\n\n"
        + table(["step", "rows x tokens", "glibc: forward+backward s", "glibc: AdamW s",
                 "trainer: forward+backward s", "trainer: AdamW s"], rows)
    )
    record("bench_cold_step", body)


if __name__ == "__main__":
    main()
