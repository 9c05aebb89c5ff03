"""Weight sync cost: the policy's weights into a running engine, by the old path (bytes
through the RPC socket) and the new one (shared memory), against copying the same bytes.

    python scripts/bench_weight_sync.py [--models tiny smollm2] [--dtypes bfloat16 float32] [--repeats 5]

Per sync, on a warm engine (the trainer's policy in float32, as in training):
* bytes: `weights_to_bytes` (cast into a new safetensors bytearray) + `Engine.load_weights`
  of the bytes (pickled through collective_rpc; vLLM's reload_weights in the worker).
* shm: `EngineWeights.write` (cast into the /dev/shm file the engine has mapped: one pass)
  + `Engine.load_weights` of the handle, split into vLLM's weight-transfer phases: start
  (layer-wise reload set up), update (copy from the mapping into the parameters), finish
  (kernel processing; on CPU, repacking) and rpc (the round trip around them).
* memcpy: one copy of the same image, into a new buffer (`bytearray(image)`: page
  faults included, the baseline version 0.1 was measured against) and into a buffer
  written once before (warm: memory bandwidth alone).
The two paths alternate, median of --repeats each.
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
from trainer.policy import EngineWeights, weights_to_bytes  # noqa: E402
from workers.engine import Engine  # noqa: E402


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="engine dtypes")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    quiet()
    rows = []
    for model_name in args.models:
        path = resolve_model_path(model_name)
        policy, _ = load_policy(path)  # float32 on CPU, as the trainer holds it
        for dtype in args.dtypes:
            engine = Engine(path, dtype=dtype, max_model_len=512, max_num_seqs=8)
            shared = EngineWeights(engine.dtype)
            try:
                times: dict[str, list[float]] = {}

                def add(key: str, seconds: float) -> None:
                    times.setdefault(key, []).append(seconds)

                engine.load_weights(shared.write(policy))  # maps the file: not timed
                shared.mapped()
                image = bytes(shared.shared.buffer)
                target = bytearray(image)  # written once: its pages are mapped before timing
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    data = weights_to_bytes(policy, engine.dtype)
                    t1 = time.perf_counter()
                    engine.load_weights(data, version=1)
                    t2 = time.perf_counter()
                    add("bytes write", t1 - t0)
                    add("bytes load", t2 - t1)
                    del data
                    t0 = time.perf_counter()
                    handle = shared.write(policy)
                    t1 = time.perf_counter()
                    engine.load_weights(handle, version=2)
                    t2 = time.perf_counter()
                    add("shm write", t1 - t0)
                    add("shm load", t2 - t1)
                    for phase in ("start", "update", "finish", "rpc"):
                        add(phase, engine.last_load_s[phase])
                    t0 = time.perf_counter()
                    fresh = bytearray(image)
                    t1 = time.perf_counter()
                    target[:] = image
                    t2 = time.perf_counter()
                    add("memcpy new", t1 - t0)
                    add("memcpy warm", t2 - t1)
                    del fresh
                m = {k: median(v) for k, v in times.items()}
                mib = f"{len(image) / 2**20:.0f}"
                name = str(engine.dtype).removeprefix("torch.")
                for way in ("bytes", "shm"):
                    sync = m[f"{way} write"] + m[f"{way} load"]
                    phases = (
                        f"{m['start']:.3f} / {m['update']:.3f} / {m['finish']:.3f} / {m['rpc']:.3f}"
                        if way == "shm" else "-"
                    )
                    rows.append([
                        model_name, name, mib, way, f"{m[f'{way} write']:.3f}", f"{m[f'{way} load']:.3f}", phases,
                        f"{sync:.3f}", f"{m['memcpy new']:.4f} / {m['memcpy warm']:.4f}",
                        f"{sync / m['memcpy new']:.1f}x / {sync / m['memcpy warm']:.1f}x",
                    ])
                    print(rows[-1], flush=True)
            finally:
                engine.shutdown()
                shared.close()
    record(
        "bench_weight_sync",
        f"median of {args.repeats} syncs per path on a warm engine, the two paths alternating; "
        "trainer policy in float32, cast to the engine dtype while written\n\n"
        + table(["model", "engine dtype", "MiB", "path", "write s (cast+copy)", "engine load s",
                 "of which start / update / finish / rpc s", "sync s", "memcpy s (new / warm buffer)",
                 "sync / memcpy (new / warm)"], rows),
    )


if __name__ == "__main__":
    main()
