"""Generation throughput with an instant reward and with a slow (0.2 s per call) one.

    python scripts/bench_rewards.py [--models tiny smollm2] [--delay 0.2] [--reward-workers 8]

Rewards run off the engine's thread (workers/rewards.py), so a slow verifier should not
slow generation down: the engine steps on while finished groups are scored, their slots
held. One engine, one worker thread, the real RolloutQueue, reward pool and
Supervisor; rounds alternate between the two rewards (the reward sleeps for the round's
delay, like a verifier waiting on I/O), so both see the same machine load; each round
is N groups from the first submit to the last group scored and put. The table shows the
medians. Goal: the slow reward at >= 0.9x the instant one's tokens/s.
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
from scripts.bench_generation import ENGINE, CyclingPrompts, workload  # noqa: E402
from scripts.benchlib import quiet, record, table  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.rewards import RewardFunction, RewardPool, RewardSpec  # noqa: E402
from workers.supervisor import Supervisor  # noqa: E402
from workers.worker import GenerationWorker, SamplingSpec  # noqa: E402

DELAY_S = [0.0]  # the current round's reward time; read by every reward call


def verifier(text: str, prompt: object) -> float:
    if DELAY_S[0]:
        time.sleep(DELAY_S[0])
    return float(len(text) % 2)


def measure(model, prompts, sampling: SamplingSpec, rounds: int, delay: float, reward_workers: int):
    """tokens/s per round with the instant and the slow reward, alternating."""
    n = len(prompts)
    queue = RolloutQueue(max_staleness=0, groups_per_step=n)  # n permits: one round at a time
    rewards = RewardPool(RewardSpec([RewardFunction("verifier", verifier)], workers=reward_workers)).start()

    def make_worker(i, on_error, start_gate):
        return GenerationWorker(
            i, build_engine=lambda: Engine(model, index=i, kvcache_gib=1, **ENGINE), queue=queue,
            prompts=CyclingPrompts(prompts), sampling=sampling, rewards=rewards,
            max_groups_in_flight=2 * ENGINE["max_num_seqs"] // sampling.group_size,  # as the Trainer does
            on_error=on_error, start_gate=start_gate,
        )

    sup = Supervisor(queue, make_worker, count=1)
    sup.start()
    rates: dict[float, list[float]] = {0.0: [], delay: []}
    try:
        sup.wait_ready(300, open_gate=False)
        for r in range(2 * rounds):
            DELAY_S[0] = (0.0, delay)[r % 2]
            t0 = time.perf_counter()
            if r == 0:
                sup.open_gate()  # the first round starts
            else:
                queue.retire(n)  # returns the permits: the next round starts
            groups = queue.get_batch(n, timeout=600, health_check=sup.check)
            tokens = sum(len(c) for g in groups for c in g.completion_token_ids)
            rates[DELAY_S[0]].append(tokens / (time.perf_counter() - t0))
        queue.retire(n)
    finally:
        sup.shutdown(30)
        rewards.shutdown()
    return rates[0.0], rates[delay], rewards.stats["calls"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.2, help="seconds per slow reward call")
    p.add_argument("--reward-workers", type=int, default=8, help="reward.workers (default: the config's)")
    args = p.parse_args()
    quiet()
    rows = []
    for name in args.models:
        model, prompts, sampling = workload(name, args)
        instant, slow, calls = measure(model, prompts, sampling, args.rounds, args.delay, args.reward_workers)
        a, b = statistics.median(instant), statistics.median(slow)
        rows.append([name, args.reward_workers, f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}", calls])
        print(rows[-1], flush=True)
    record(
        "bench_rewards",
        f"{args.prompts} prompts x {args.group_size} samples, max_tokens={args.max_tokens}, thread executor, "
        f"median of {args.rounds} rounds each, alternating\n\n"
        + table(
            ["model", "reward.workers", "instant reward tokens/s", f"{args.delay} s reward tokens/s", "ratio",
             "reward calls"],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
