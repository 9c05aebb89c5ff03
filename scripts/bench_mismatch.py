"""How far the trainer's log-probs of sampled tokens are from the engine's, for each
engine dtype and trainer numerics: what `mismatch/*` logs every step, measured on one
model outside a run (a run's `RUN_DIR/model` too, to see where training took it).

    python scripts/bench_mismatch.py [--model smollm2|DIR] [--engine-dtypes float32 bfloat16]

A real engine samples 4 completions (48 tokens at most) of 8 arithmetic prompts per
engine dtype; the trainer's `token_logprobs` scores them in float32, in mixed precision
(bfloat16 autocast, what trainer.dtype=auto picks on bfloat16 hardware beside a
bfloat16 engine), and in mixed precision with the LM head computed in float32. The
table: mean and largest |trainer - engine| log-prob over the sampled tokens, and the
share of tokens whose ratio exp(trainer - engine) lies outside the PPO clip range
[1 - algo.clip_low, 1 + algo.clip_high] (such a token gets no gradient where its
advantage pushes it further out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from scripts.benchlib import record, table  # noqa: E402


def sample(model_path: str, dtype: str, prompts: list[list[int]], samples: int, max_tokens: int, timeout_s: float):
    """(prompts, completions, engine log-probs), one row per completion."""
    from workers.engine import Engine

    engine = Engine(model_path, dtype=dtype, seed=0)
    try:
        for i, p in enumerate(prompts):
            engine.submit(f"p{i}", p, n=samples, max_tokens=max_tokens, seed=i)
        done, deadline = [], time.monotonic() + timeout_s
        while len(done) < len(prompts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(prompts) - len(done)} prompts unfinished after {timeout_s} s")
            done += engine.step()
    finally:
        engine.shutdown()
    rows = [(f.prompt_token_ids, list(c.token_ids), list(c.logprobs)) for f in done for c in f.completions]
    return [list(col) for col in zip(*rows)]


def float32_head(model):
    """The LM head computed in float32 under autocast (the rest of the forward in bfloat16)."""
    import torch

    head = model.get_output_embeddings()

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), head.weight.float())

    head.forward = forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a built-in model name or a model directory")
    p.add_argument("--engine-dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--name", help="section name in docs/benchmarks.md (default: mismatch-MODEL)")
    args = p.parse_args()

    import torch

    from trainer.config import AlgoConfig
    from trainer.models import load_model, load_tokenizer, resolve_model_path
    from trainer.policy import TokenBatch, token_logprobs
    from trainer.tasks import ArithmeticTask, render_prompt

    path = str(resolve_model_path(args.model))
    tokenizer = load_tokenizer(path)
    task = ArithmeticTask(seed=5, max_operand=10)
    prompts = [render_prompt(tokenizer, task.prompt(i)) for i in range(args.prompts)]
    low, high = 1 - AlgoConfig.clip_low, 1 + AlgoConfig.clip_high
    rows = []
    for dtype in args.engine_dtypes:
        P, C, B = sample(path, dtype, prompts, args.samples, args.max_tokens, args.timeout_s)
        batch = TokenBatch.build(P, C, B, tokenizer.pad_token_id or 0, "cpu")
        mask = batch.completion_mask > 0
        model = load_model(path, torch.device("cpu"), torch.float32).eval()
        for name, autocast in (("float32", None), ("mixed", torch.bfloat16), ("mixed, float32 LM head", torch.bfloat16)):
            if name.endswith("head"):
                float32_head(model)
            with torch.no_grad():
                logprobs, _ = token_logprobs(model, batch, 1.0, with_entropy=False, autocast=autocast)
            gap = (logprobs - batch.behaviour_logprobs)[mask]
            ratio = gap.exp()
            outside = ((ratio < low) | (ratio > high)).float().mean()
            rows.append([dtype, name, int(mask.sum()), f"{gap.abs().mean():.4f}", f"{gap.abs().max():.3f}", f"{outside:.3f}"])
    header = ["engine dtype", "trainer", "tokens", "mean |gap|", "max |gap|", "outside clip"]
    record(args.name or f"mismatch-{os.path.basename(os.path.normpath(args.model))}", table(header, rows))


if __name__ == "__main__":
    main()
