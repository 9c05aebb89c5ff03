"""Weight sync cost: SmolLM2's weights into a running engine, against copying the same
bytes in memory.

    python scripts/bench_weight_sync.py [--model smollm2] [--repeats 5] [--dtype auto]

Sync = serialize the policy to safetensors bytes in the engine's dtype
(trainer.policy.weights_to_bytes) + Engine.load_weights (collective_rpc to the worker
extension, which calls vLLM's reload_weights). Baseline = one in-memory copy of the
same bytes. Median of --repeats on a warm engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from scripts.benchlib import quiet, record, table  # noqa: E402
from trainer.models import load_policy, resolve_model_path  # noqa: E402
from trainer.policy import weights_to_bytes  # noqa: E402
from workers.engine import Engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", nargs="+", default=["auto", "float32"], help="engine dtypes to measure")
    args = p.parse_args()
    quiet()
    path = resolve_model_path(args.model)
    policy, _ = load_policy(path)
    rows = []
    for dtype in args.dtype:
        engine = Engine(path, dtype=dtype, max_model_len=512, max_num_seqs=8)
        try:
            ser, load, copy = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                data = weights_to_bytes(policy, engine.dtype)
                t1 = time.perf_counter()
                engine.load_weights(data, version=1)
                t2 = time.perf_counter()
                bytearray(data)  # the baseline: one copy of the same bytes
                t3 = time.perf_counter()
                ser.append(t1 - t0)
                load.append(t2 - t1)
                copy.append(t3 - t2)
            s, l, c = (statistics.median(x) for x in (ser, load, copy))
            rows.append([
                args.model, str(engine.dtype).removeprefix("torch."), f"{len(data) / 2**20:.0f}",
                f"{s:.3f}", f"{l:.3f}", f"{s + l:.3f}", f"{c:.4f}", f"{(s + l) / c:.0f}x",
            ])
            print(rows[-1], flush=True)
        finally:
            engine.shutdown()
    record(
        "bench_weight_sync",
        f"median of {args.repeats} syncs on a warm engine\n\n"
        + table(["model", "engine dtype", "MiB", "serialize s", "load_weights s", "sync s", "memcpy s",
                 "sync / memcpy"], rows),
    )


if __name__ == "__main__":
    main()
