"""Nothing lost, end to end: scripts/train.py (the launcher) with the tiny model and a
real vLLM engine, stopped by SIGKILL, SIGTERM and an engine death, then resumed. With
max_staleness=0 and one engine, step k of any run trains the same prompts, so a run
that was interrupted and resumed must match an uninterrupted one step by step."""

import json
import os
import signal

import pytest

from tests.faults import Run, is_event
from tests.helpers import alive
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.engine

STEPS = 6
# engine.dtype=float32 and a large lr: a resumed engine that did not get the resumed
# weights would show in sync/logprob_max_diff at once.
COMMON = (
    f"run.steps={STEPS}", "algo.max_staleness=0", "engine.count=1", "gen.max_tokens=16",
    "engine.max_model_len=256", "run.checkpoint_every=1", "run.keep_checkpoints=2",
    "engine.dtype=float32", "algo.lr=1e-2",
)


def start(workdir, model_path, run_dir, *extra):
    workdir.mkdir(parents=True, exist_ok=True)
    return Run(workdir, model_path, *COMMON, f"run.output_dir={run_dir}", *extra)


def prompts_per_step(*event_lists):
    """{step: prompt indices} from the `batch` events of consecutive runs of one output
    dir; a step trained again after a resume replaces the lost one."""
    out = {}
    for events in event_lists:
        for e in events:
            if e["event"] == "batch":
                out[e["step"]] = e["prompt_indices"]
    return out


def steps_trained(events):
    return [e["step"] for e in events if e["event"] == "train_step"]


def checkpoint_saved(step):
    return lambda e: e.get("event") == "checkpoint_saved" and e.get("checkpoint_step") == step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_path):
    """An uninterrupted run: its prompts per step."""
    tmp = tmp_path_factory.mktemp("reference")
    run = start(tmp, tiny_model_path, tmp / "run")
    assert run.finish(timeout=300) == 0, run.events[-3:]
    assert steps_trained(run.events) == list(range(STEPS))
    per_step = prompts_per_step(run.events)
    assert sorted(per_step) == list(range(STEPS))
    return per_step


def test_killed_resumed_past_a_corrupt_checkpoint_stopped_and_restarted_nothing_lost(
    tmp_path, tiny_model_path, reference
):
    """One output dir, four processes, every way a run can end: the training process
    SIGKILLed; a resume past a corrupt checkpoint, stopped by SIGTERM mid-step; a resume
    with --max-restarts 1 whose engine dies, restarted, finishing. Together they train
    exactly the reference's prompts, step by step."""
    run_dir = tmp_path / "run"

    # 1. SIGKILL of the training process (not the launcher), after checkpoint 3.
    first = start(tmp_path / "first", tiny_model_path, run_dir)
    child = first.wait_for(is_event("training_process_started"))["pid"]
    engine_pids = first.wait_for(is_event("worker_started"))["engine_pids"]
    first.wait_for(checkpoint_saved(3))
    os.kill(child, signal.SIGKILL)
    assert first.finish(timeout=60) == 1
    last = first.events[-1]
    assert last["event"] == "run_failed" and last["error_type"] == "ProcessKilled" and last["signal"] == "SIGKILL"
    # The launcher killed the engine the dead trainer left behind; nothing survives.
    assert set(engine_pids) <= set(last["orphans_killed"])
    assert alive([first.proc.pid, child, *engine_pids]) == []

    # 2. The latest checkpoint is corrupt: the resume reports it and takes the one before.
    latest = ckpt.latest_valid_checkpoint(run_dir)  # step 3, unless step 4 was quicker than the kill
    n = int(latest.name.split("-")[1])
    assert n in (3, 4)
    with open(latest / ckpt.MODEL, "r+b") as f:  # one flipped byte in the weights
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = start(tmp_path / "second", tiny_model_path, run_dir)
    engine_pids = second.wait_for(is_event("worker_started"))["engine_pids"]
    # 3. ... and is stopped by SIGTERM to the launcher (forwarded) in its first step.
    second.wait_for(lambda e: e.get("event") == "phase" and e.get("phase") == "train")
    os.kill(second.proc.pid, signal.SIGTERM)
    assert second.finish(timeout=60) == 143
    (invalid,) = [e for e in second.events if e["event"] == "checkpoint_invalid"]
    assert invalid["path"] == str(latest) and "model.safetensors: sha256" in invalid["reason"]
    (resumed,) = [e for e in second.events if e["event"] == "resumed"]
    assert resumed["checkpoint_step"] == n - 1 and resumed["policy_version"] == n - 1
    # The engine generated the first resumed step with the resumed weights.
    (step,) = [e for e in second.events if e["event"] == "train_step"]  # finished, then stopped
    assert step["step"] == n - 1 and step["policy_version"] == n and step["sync/logprob_max_diff"] < 1e-3
    last = second.events[-1]
    assert last["event"] == "run_interrupted" and last["signal"] == "SIGTERM" and last["graceful"] is True
    assert last["step"] == n and last["checkpoint"] == str(run_dir / "checkpoints" / f"step-{n:08d}")
    ckpt.verify_checkpoint(last["checkpoint"])  # the corrupt one, written again
    assert alive([second.proc.pid, *second.children, *engine_pids]) == []

    # 4. With --max-restarts 1, an engine death is followed by a restart that finishes.
    third = start(tmp_path / "third", tiny_model_path, run_dir, "--max-restarts", "1")
    dead_engine = third.wait_for(is_event("worker_started"))["engine_pids"]
    third.wait_for(checkpoint_saved(n + 1))
    os.kill(dead_engine[0], signal.SIGKILL)  # EngineCore
    assert third.finish(timeout=300) == 0, third.events[-3:]
    names = [e["event"] for e in third.events]
    assert third.events[names.index("run_failed")]["error_type"] == "EngineDeadError"
    restart = third.events[names.index("run_restart")]
    assert restart["restart"] == 1 and restart["exit_code"] == 1
    resumed = [e["checkpoint_step"] for e in third.events if e["event"] == "resumed"]
    assert resumed[0] == n and len(resumed) == 2 and resumed[1] > n
    assert len(third.children) == 2 and alive([*third.children, *dead_engine]) == []
    assert names[-1] == "run_done"

    assert prompts_per_step(first.events, second.events, third.events) == reference
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(
        range(STEPS)
    )
