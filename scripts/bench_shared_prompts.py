"""What forwarding each prompt once per micro-batch (trainer.share_prompts) saves against
every row forwarding its whole sequence.

    python scripts/bench_shared_prompts.py [--model smollm2] [--dtype float32] [--rounds 4]

The trainer's own training work for one step's rows, no engine, one process, memory kept
as the trainer keeps it: the rows in the trainer's micro-batch order
(`micro_batch_order`), then per micro-batch TokenBatch.build, `token_logprobs` and the
backward of a loss-shaped sum over completion tokens. A step is `--groups` groups of
`--group-size` rows: one 44-token prompt each (the arithmetic task's chat prompt for
SmolLM2) and completions of 30-47 tokens (an untrained policy), 10-29 (a trained one), or
10-29 with one cut off at 48 per group. Each step is run both ways, in alternating order,
so the machine's drift hits both alike. The table has the tokens forwarded (padding
included) and the median seconds over rounds after the first (the first pays the
process's cold start).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.benchlib import cpu_model, quiet, record, table, training_model  # noqa: E402

COMPLETIONS = {  # name -> the token counts of a group's completions
    "30-47": lambda rng, g: [rng.randrange(30, 48) for _ in range(g)],
    "10-29": lambda rng, g: [rng.randrange(10, 30) for _ in range(g)],
    "10-29, one 48": lambda rng, g: [48] + [rng.randrange(10, 30) for _ in range(g - 1)],
}
PROMPT_TOKENS = 44


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", help="trainer.dtype: float32 or mixed")
    p.add_argument("--groups", type=int, default=4, help="groups per step (algo.groups_per_step's default)")
    p.add_argument("--group-size", type=int, default=8, help="rows per prompt (algo.group_size's default)")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per micro-batch (algo.micro_batch_size's default)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    quiet()
    import torch

    import trainer.policy as policy

    device = torch.device("cpu")
    model, autocast = training_model(args.model, args.dtype)
    assert policy.can_share_prompts(model), args.model
    ways = {"shared prompts": True, "whole rows": False}
    rng = random.Random(0)
    seconds = {(c, way): [] for c in COMPLETIONS for way in ways}
    tokens = {(c, way): [] for c in COMPLETIONS for way in ways}
    for r in range(args.rounds):
        for name, lengths in COMPLETIONS.items():
            rows = []
            for _ in range(args.groups):
                prompt = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
                rows += [{"prompt": prompt, "completion": [rng.randrange(100, 40000) for _ in range(n)]}
                         for n in lengths(rng, args.group_size)]
            for way in (list(ways) if r % 2 else list(ways)[::-1]):
                share = ways[way]
                order = policy.micro_batch_order(rows, share, args.micro_batch)
                chunks = [order[k : k + args.micro_batch] for k in range(0, len(order), args.micro_batch)]
                t0 = time.perf_counter()
                for chunk in chunks:
                    prompts, completions = [c["prompt"] for c in chunk], [c["completion"] for c in chunk]
                    batch = policy.TokenBatch.build(prompts, completions, [[0.0] * len(c) for c in completions], 0,
                                                    device, share_prompts=share)
                    logprobs, _ = policy.token_logprobs(model, batch, 1.0, autocast=autocast)
                    (logprobs * batch.completion_mask).sum().backward()
                seconds[(name, way)].append(time.perf_counter() - t0)
                tokens[(name, way)].append(sum(policy.forwarded_tokens(
                    [c["prompt"] for c in chunk], [c["completion"] for c in chunk], share) for chunk in chunks))
                model.zero_grad(set_to_none=True)
            print(f"round {r}, completions {name}: "
                  + ", ".join(f"{way} {seconds[(name, way)][-1]:.2f} s" for way in ways), flush=True)

    def med(values):
        return statistics.median(values[1:] or values)

    rows = [
        [name, *(f"{med(tokens[(name, way)]):.0f}" for way in ways), *(f"{med(seconds[(name, way)]):.2f}" for way in ways),
         f"{med(seconds[(name, 'whole rows')]) / med(seconds[(name, 'shared prompts')]):.2f}x"]
        for name in COMPLETIONS
    ]
    body = (
        f"{args.model}, trainer.dtype={args.dtype}, {cpu_model()}, {torch.get_num_threads()} torch threads; a step of "
        f"{args.groups} groups x {args.group_size} rows, {PROMPT_TOKENS}-token prompts, micro-batches of "
        f"{args.micro_batch}; forward+backward seconds per step, medians of rounds 1-{args.rounds - 1}\n\n"
        + table(["completion tokens", "shared: tokens forwarded", "whole rows: tokens forwarded",
                 "shared prompts s", "whole rows s", "speed-up"], rows)
    )
    record("bench_shared_prompts", body)


if __name__ == "__main__":
    main()
