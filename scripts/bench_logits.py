"""What computing the logits of the completion's columns only (`logits_to_keep`, what
trainer.policy.token_logprobs does) saves against computing them for every column.

    python scripts/bench_logits.py [--model smollm2] [--dtype float32] [--rounds 5]

The trainer's own forward and backward (trainer.models.load_model, `token_logprobs`, a
loss-shaped sum over completion tokens), no engine, one process, memory kept as the
trainer keeps it. Micro-batches of `--rows` rows with 44-token prompts (the arithmetic
task's chat prompt for SmolLM2) and completions of 30-47 tokens (an untrained policy)
or 10-29 tokens (a trained one); each micro-batch is run both ways, in alternating
order, so the machine's drift hits both alike. The table has the median seconds over
rounds after the first (the first pays the process's cold start).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.benchlib import cpu_model, quiet, record, table, training_model  # noqa: E402

COMPLETIONS = ((30, 48), (10, 30))  # token ranges: long (untrained policy), short (trained)
PROMPT_TOKENS = 44


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", help="trainer.dtype: float32 or mixed")
    p.add_argument("--rows", type=int, default=16, help="rows per micro-batch (algo.micro_batch_size's default)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    quiet()
    import torch

    import trainer.policy as policy

    device = torch.device("cpu")
    model, autocast = training_model(args.model, args.dtype)
    ways = ("completion columns", "every column")
    rng = random.Random(0)
    seconds = {(c, way): [] for c in COMPLETIONS for way in ways}
    widths = {c: [] for c in COMPLETIONS}
    for r in range(args.rounds):
        for lo, hi in COMPLETIONS:
            prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(args.rows)]
            completions = [[rng.randrange(100, 40000) for _ in range(rng.randrange(lo, hi))] for _ in range(args.rows)]
            kept = policy.TokenBatch.build(prompts, completions, [[0.0] * len(c) for c in completions], 0, device)
            # first_column 0: the logits of every column, as before logits_to_keep.
            batches = {"completion columns": kept, "every column": dataclasses.replace(kept, first_column=0)}
            widths[(lo, hi)].append(kept.input_ids.shape[1])
            for way in (ways if r % 2 else ways[::-1]):
                batch = batches[way]
                t0 = time.perf_counter()
                logprobs, _ = policy.token_logprobs(model, batch, 1.0, autocast=autocast)
                (logprobs * batch.completion_mask).sum().backward()
                seconds[((lo, hi), way)].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            print(f"round {r}, completions {lo}-{hi - 1}: "
                  + ", ".join(f"{way} {seconds[((lo, hi), way)][-1]:.2f} s" for way in ways), flush=True)

    def med(c, way):
        return statistics.median(seconds[(c, way)][1:] or seconds[(c, way)])

    rows = [
        [f"{lo}-{hi - 1}", f"{args.rows} x {statistics.median(widths[(lo, hi)]):.0f}",
         *(f"{med((lo, hi), way):.2f}" for way in ways),
         f"{med((lo, hi), 'every column') / med((lo, hi), 'completion columns'):.2f}x"]
        for lo, hi in COMPLETIONS
    ]
    cpu = cpu_model()
    body = (
        f"{args.model}, trainer.dtype={args.dtype}, {cpu}, {torch.get_num_threads()} torch threads, "
        f"{PROMPT_TOKENS}-token prompts; forward+backward seconds, medians of rounds 1-{args.rounds - 1}\n\n"
        + table(["completion tokens", "rows x tokens", "logits of the completion columns s", "logits of every column s",
                 "speed-up"], rows)
    )
    record("bench_logits", body)


if __name__ == "__main__":
    main()
