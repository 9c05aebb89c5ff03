"""What a training step costs cold and warm: the first optimizer steps of a fresh process.

    python scripts/bench_cold_step.py [--model smollm2] [--dtype mixed] [--steps 6]

The trainer's own pieces, no engine: the policy loaded as the trainer loads it
(trainer.models.load_model), AdamW as the trainer builds it, `token_logprobs` and a
loss-shaped sum over completion tokens, `--steps` steps of `--rows` rows (30 prompt
tokens, completions of 30-47 tokens, then 10-29, alternating in pairs: micro-batches of
two shapes, as a run has). For each step: its batch shape, forward + backward seconds,
AdamW step seconds and tokens/s. The first rows show what the first step of a run pays
that later ones do not (issue #15: first step no later than engines ready + one step).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.benchlib import quiet, record, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="mixed", help="trainer.dtype: mixed or float32")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=16, help="rows per step (algo.micro_batch_size's default)")
    args = p.parse_args()
    quiet()
    import torch

    from trainer.models import load_model, resolve_model_path
    from trainer.policy import TokenBatch, resolve_dtype, token_logprobs

    device = torch.device("cpu")
    dtype, autocast = resolve_dtype(args.dtype, device)
    t = time.perf_counter()
    model = load_model(resolve_model_path(args.model), device, dtype).train()
    load_s = time.perf_counter() - t
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rng = random.Random(0)
    rows = []
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
        tokens = int(batch.attention_mask.sum())
        rows.append([step, f"{args.rows} x {batch.input_ids.shape[1]}", f"{t1 - t0:.2f}", f"{t2 - t1:.2f}",
                     f"{tokens / (t1 - t0):.0f}"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    body = (
        f"{args.model}, trainer.dtype={args.dtype}, {cpu}, {torch.get_num_threads()} torch threads, one fresh process "
        f"(model loaded in {load_s:.1f} s)\n\n"
        + table(["step", "rows x tokens", "forward+backward s", "AdamW step s", "tokens/s"], rows)
    )
    record("bench_cold_step", body)


if __name__ == "__main__":
    main()
