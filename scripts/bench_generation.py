"""Generation throughput: the worker-thread pipeline against plain `vllm.LLM.generate`.

    python scripts/bench_generation.py [--models tiny smollm2] [--prompts 32] [--group-size 8]

Same prompts (arithmetic, chat template), same sampling (n = group size, per-prompt
seed, temperature 1, logprobs=0), same engine arguments (workers.engine.engine_kwargs).
The pipeline is the real one: RolloutQueue slots -> GenerationWorker thread -> Engine
adapter -> reward -> queue -> get_batch. Rounds alternate between the two (engine start
excluded), so both see the same machine load; the table shows the medians. Target: the
pipeline at >= 0.95 of plain vLLM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from capacity import RolloutQueue  # noqa: E402
from scripts.benchlib import quiet, record, table  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trainer.models import resolve_model_path  # noqa: E402
from trainer.tasks import ArithmeticTask, render_prompt  # noqa: E402
from workers.engine import Engine, engine_kwargs  # noqa: E402
from workers.rewards import RewardFunction, RewardPool, RewardSpec  # noqa: E402
from workers.supervisor import Supervisor  # noqa: E402
from workers.worker import GenerationWorker, PromptItem, SamplingSpec  # noqa: E402

ENGINE = dict(max_model_len=512, max_num_seqs=64, seed=0, dtype="auto", logprobs_mode="processed_logprobs",
              device_id=None, gpu_memory_utilization=0.85, enforce_eager=True)


class CyclingPrompts:
    """The same N prompts every round: prompt i of a round has index i (and so seed i)."""

    def __init__(self, token_ids: list[list[int]]):
        self.token_ids = token_ids
        self.i = 0

    def next(self) -> PromptItem:  # called from one worker thread only here
        index = self.i % len(self.token_ids)
        self.i += 1
        return PromptItem(index, self.token_ids[index], None)


def measure(model, prompts, sampling: SamplingSpec, rounds: int) -> tuple[list[float], list[float]]:
    """tokens/s of plain vLLM and of the pipeline, rounds alternating so that both see
    the same machine load. Both engines are up all along; only one works at a time."""
    from vllm import LLM, SamplingParams

    n = len(prompts)
    llm = LLM(**engine_kwargs(model, **ENGINE))
    params = [
        SamplingParams(n=sampling.group_size, max_tokens=sampling.max_tokens, seed=sampling.request_seed(i), logprobs=0)
        for i in range(n)
    ]
    queue = RolloutQueue(max_staleness=0, groups_per_step=n)  # n permits: one round at a time
    source = CyclingPrompts(prompts)
    rewards = RewardPool(RewardSpec([RewardFunction("zero", lambda text, prompt: 0.0)])).start()

    def make_worker(i, on_error, start_gate):
        return GenerationWorker(
            i,
            build_engine=lambda: Engine(model, index=i, kvcache_gib=1, **ENGINE),
            queue=queue,
            prompts=source,
            sampling=sampling,
            rewards=rewards,
            max_groups_in_flight=2 * ENGINE["max_num_seqs"] // sampling.group_size,  # as the Trainer does
            on_error=on_error,
            start_gate=start_gate,
        )

    sup = Supervisor(queue, make_worker, count=1)
    sup.start()
    plain, ours = [], []
    try:
        sup.workers[0].ready.wait(300)  # engine built; generation waits for the gate
        for r in range(rounds):
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            plain.append(sum(len(c.token_ids) for o in outs for c in o.outputs) / (time.perf_counter() - t0))

            t0 = time.perf_counter()
            if r == 0:
                sup.wait_ready(300)  # opens the gate: the first round starts
            else:
                queue.retire(n)  # returns the permits: the next round starts
            groups = queue.get_batch(n, timeout=600, health_check=sup.check)
            ours.append(sum(len(c) for g in groups for c in g.completion_token_ids) / (time.perf_counter() - t0))
        queue.retire(n)
    finally:
        sup.shutdown(30)
        rewards.shutdown()
        llm.llm_engine.engine_core.shutdown()
    return plain, ours


def workload(name: str, args: argparse.Namespace) -> tuple[str, list[list[int]], SamplingSpec]:
    """The model path, `args.prompts` arithmetic prompts in its chat template, and the
    sampling (n = args.group_size, max_tokens = args.max_tokens)."""
    model = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = ArithmeticTask(seed=0)
    prompts = [render_prompt(tokenizer, task.prompt(i)) for i in range(args.prompts)]
    return model, prompts, SamplingSpec(group_size=args.group_size, max_tokens=args.max_tokens, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    quiet()
    rows = []
    for name in args.models:
        model, prompts, sampling = workload(name, args)
        plain_rates, our_rates = measure(model, prompts, sampling, args.rounds)
        plain, ours = statistics.median(plain_rates), statistics.median(our_rates)
        rows.append([name, f"{plain:,.0f}", f"{ours:,.0f}", f"{ours / plain:.2f}"])
        print(rows[-1], flush=True)
    record(
        "bench_generation",
        f"{args.prompts} prompts x {args.group_size} samples, max_tokens={args.max_tokens}, "
        f"median of {args.rounds} alternating rounds on warm engines\n\n"
        + table(["model", "plain vLLM tokens/s", "worker pipeline tokens/s", "ratio"], rows),
    )


if __name__ == "__main__":
    main()
