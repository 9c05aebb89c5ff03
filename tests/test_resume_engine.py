"""Nothing lost, end to end: scripts/train.py (the launcher) with the tiny model and a
real vLLM engine, with one trainer rank and with two, stopped by SIGKILL, SIGTERM,
exceptions and engine deaths, then resumed. With max_staleness=0, one engine and two
groups per step, step k of any run trains prompts 2k and 2k+1 (an uninterrupted run
does: tests/trainer/test_resume.py), so runs that were interrupted and resumed must
train exactly those, step by step."""

import json
import os
import signal
import time

import pytest

from tests.faults import REPO, Run, event_time, is_event
from tests.helpers import alive
from trainer import checkpoint as ckpt
from workers import shm

pytestmark = pytest.mark.engine

STEPS = 8
# float32 on both sides and a large lr: a resumed engine that did not get the resumed
# weights would show in sync/logprob_max_diff at once.
COMMON = (
    f"run.steps={STEPS}", "algo.max_staleness=0", "engine.count=1", "gen.max_tokens=16",
    "engine.max_model_len=256", "run.checkpoint_every=1", "run.keep_checkpoints=2",
    "engine.dtype=float32", "trainer.dtype=float32", "algo.lr=1e-2",
)


def start(workdir, model_path, run_dir, *extra, env=None):
    workdir.mkdir(parents=True, exist_ok=True)
    return Run(workdir, model_path, *COMMON, f"run.output_dir={run_dir}", *extra, env=env)


def prompts_per_step(*event_lists):
    """{step: prompt indices} from the `batch` events of consecutive runs of one output
    dir; a step trained again after a resume replaces the lost one."""
    out = {}
    for events in event_lists:
        for e in events:
            if e["event"] == "batch":
                out[e["step"]] = e["prompt_indices"]
    return out


def checkpoint_saved(step):
    return lambda e: e.get("event") == "checkpoint_saved" and e.get("checkpoint_step") == step


# What an uninterrupted run trains at each step (Run's default: 2 groups per step).
REFERENCE = {k: [2 * k, 2 * k + 1] for k in range(STEPS)}


RANKS2 = "trainer.ranks=2"
# Rank 1 raises in its second optimizer step (tests/rank1_fault/sitecustomize.py).
FAULT_ON_RANK1 = {"PYTHONPATH": str(REPO / "tests" / "rank1_fault"), "RLT_FAIL_AT_STEP": "2"}
FAULT_TO_EXIT_LIMIT_S = 10.0


def latest_step(run_dir) -> int:
    return int(ckpt.latest_valid_checkpoint(run_dir).name.split("-")[1])


def test_every_way_a_run_ends_with_one_rank_and_two_loses_nothing(tmp_path, tiny_model_path):
    """One output dir, eight processes, every way a run can end, across rank counts:
    1. one rank, the training process SIGKILLed;
    2. two ranks (a 1-rank checkpoint), an exception on rank 1 only;
    3. two ranks, EngineCore SIGKILLed while rank 1 waits for a batch;
    4. two ranks, rank 1 SIGKILLed mid-step;
    5. one rank (a 2-rank checkpoint) resuming past a corrupt checkpoint, SIGTERM;
    6. two ranks (a 1-rank checkpoint), SIGTERM;
    7. two ranks with --max-restarts 1: the engine dies, the restart finishes.
    Each failure ends the run within seconds with one run_failed naming the cause (and
    the rank), and leaves no process; together the runs train exactly the reference's
    prompts of an uninterrupted run, step by step, every step on the weights the engine
    just received."""
    run_dir = tmp_path / "run"
    runs = []

    def begin(name, *extra, env=None):
        run = start(tmp_path / name, tiny_model_path, run_dir, *extra, env=env)
        runs.append(run)
        return run

    def check_failed(run, error_type, rank, since):
        rc = run.finish(timeout=60)
        exit_wall = time.time()
        assert rc == 1, run.events[-3:]
        last = run.events[-1]
        assert last["event"] == "run_failed" and last["error_type"] == error_type, last
        assert last.get("rank") == rank, last
        assert [e["event"] for e in run.events].count("run_failed") == 1
        assert exit_wall - since < FAULT_TO_EXIT_LIMIT_S, exit_wall - since
        assert alive([run.proc.pid, *run.pids]) == []
        assert run.files_left() == []
        return last

    def check_stopped(run):
        assert run.finish(timeout=60) == 143, run.events[-3:]
        last = run.events[-1]
        assert last["event"] == "run_interrupted" and last["signal"] == "SIGTERM" and last["graceful"] is True
        assert last["checkpoint"] == str(run_dir / "checkpoints" / f"step-{last['step']:08d}")
        ckpt.verify_checkpoint(last["checkpoint"])
        assert alive([run.proc.pid, *run.pids]) == []
        assert run.files_left() == []
        return last

    # 1. SIGKILL of the training process (not the launcher), after checkpoint 2.
    first = begin("first")
    child = first.wait_for(is_event("training_process_started"))["pid"]
    engine_pids = first.wait_for(is_event("worker_started"))["engine_pids"]
    # vLLM's message queues and its executor's lock (/dev/shm/psm_*, sem.mp-*). Only
    # this run's: under xdist another test's engines make and remove theirs meanwhile.
    engine_segments = shm.held_by(engine_pids)
    assert any(name.startswith("psm_") for name in engine_segments), engine_segments
    first.wait_for(checkpoint_saved(2))
    os.kill(child, signal.SIGKILL)
    assert first.finish(timeout=60) == 1
    last = first.events[-1]
    assert last["event"] == "run_failed" and last["error_type"] == "ProcessKilled" and last["signal"] == "SIGKILL"
    # The launcher killed the engine the dead trainer left behind; nothing survives.
    assert set(engine_pids) <= set(last["orphans_killed"])
    assert alive([first.proc.pid, child, *engine_pids]) == []
    # The killed engine's scratch directory (its sockets) was the launcher's to remove.
    assert [shm.scratch_label(name) for name in last["tmp_removed"]] == ["engine0"], last["tmp_removed"]
    assert first.files_left() == []
    # Whatever of them its SIGKILLed processes could not unlink, the launcher removed.
    assert engine_segments & shm.segments() == set(), engine_segments & shm.segments()
    n = latest_step(run_dir)  # 2, unless step 3 was quicker than the kill

    # 2. Two ranks resume the 1-rank checkpoint; rank 1 raises in its second step.
    second = begin("second", RANKS2, env=FAULT_ON_RANK1)
    assert second.wait_for(is_event("resumed"), timeout=300)["checkpoint_step"] == n
    failed = second.wait_for(is_event("rank_failed", rank=1), timeout=300)
    last = check_failed(second, "RuntimeError", 1, event_time(failed))
    assert last["error"] == "injected fault on rank 1" and last["step"] == n + 1
    assert any("_optimizer_step" in line for line in last["traceback"])
    assert sorted(e["rank"] for e in second.events if e["event"] == "setup") == [0, 1]  # every rank's logs say which
    n = latest_step(run_dir)
    assert n >= 3

    # 3. EngineCore SIGKILLed while rank 1 waits for rank 0's first batch.
    third = begin("third", RANKS2)
    engine = third.wait_for(is_event("worker_started"), timeout=300)["engine_pids"][0]
    time.sleep(0.3)
    killed = time.time()
    os.kill(engine, signal.SIGKILL)
    last = check_failed(third, "EngineDeadError", 0, killed)
    assert last["worker"] == "gen-0" and last["engine"] == 0

    # 4. Rank 1 SIGKILLed in the middle of a step.
    fourth = begin("fourth", RANKS2)
    rank1 = fourth.wait_for(is_event("setup", rank=1), timeout=300)["pid"]
    fourth.wait_for(is_event("phase", phase="train"), timeout=300)
    killed = time.time()
    os.kill(rank1, signal.SIGKILL)
    last = check_failed(fourth, "ProcessKilled", 1, killed)
    assert last["signal"] == "SIGKILL" and last["pid"] == rank1
    n = latest_step(run_dir)

    # 5. The latest checkpoint (2 ranks wrote it) is corrupt: one rank resumes from the
    # one before, and is stopped by SIGTERM to the launcher (forwarded) in its first step.
    latest = ckpt.latest_valid_checkpoint(run_dir)
    with open(latest / ckpt.MODEL, "r+b") as f:  # one flipped byte in the weights
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    fifth = begin("fifth")
    fifth.wait_for(lambda e: e.get("event") == "phase" and e.get("phase") == "train", timeout=300)
    os.kill(fifth.proc.pid, signal.SIGTERM)
    last = check_stopped(fifth)
    (invalid,) = [e for e in fifth.events if e["event"] == "checkpoint_invalid"]
    assert invalid["path"] == str(latest) and "model.safetensors: crc32" in invalid["reason"]
    (resumed,) = [e for e in fifth.events if e["event"] == "resumed"]
    assert resumed["checkpoint_step"] == n - 1 and resumed["policy_version"] == n - 1
    (step,) = [e for e in fifth.events if e["event"] == "train_step"]  # finished, then stopped
    assert step["step"] == n - 1 and step["policy_version"] == n  # the corrupt one, written again
    assert last["step"] == n

    # 6. Two ranks resume the 1-rank checkpoint, stopped the same way after a step.
    sixth = begin("sixth", RANKS2)
    assert sixth.wait_for(is_event("resumed"), timeout=300)["checkpoint_step"] == n
    sixth.wait_for(is_event("train_step"), timeout=300)
    os.kill(sixth.proc.pid, signal.SIGTERM)
    n = check_stopped(sixth)["step"]

    # 7. Two ranks, --max-restarts 1: an engine death, then a restart that finishes.
    seventh = begin("seventh", RANKS2, "--max-restarts", "1")
    dead_engine = seventh.wait_for(is_event("worker_started"), timeout=300)["engine_pids"]
    seventh.wait_for(checkpoint_saved(n + 1), timeout=300)
    os.kill(dead_engine[0], signal.SIGKILL)  # EngineCore
    assert seventh.finish(timeout=300) == 0, seventh.events[-3:]
    names = [e["event"] for e in seventh.events]
    failed = seventh.events[names.index("run_failed")]
    assert failed["error_type"] == "EngineDeadError" and failed["rank"] == 0
    restart = seventh.events[names.index("run_restart")]
    assert restart["restart"] == 1 and restart["exit_code"] == 1
    resumed = [e["checkpoint_step"] for e in seventh.events if e["event"] == "resumed"]
    assert resumed[0] == n and len(resumed) == 2 and resumed[1] > n
    assert len(seventh.children) == 2 and alive([seventh.proc.pid, *seventh.pids]) == []
    assert seventh.files_left() == []
    assert names[-1] == "run_done"
    (final,) = [e for e in seventh.events if e["event"] == "capacity_final" and e["closed"]][-1:]
    assert final["in_flight"] == 0 and final["queued"] == 0 and final["free"] == final["permits"]

    steps = [e for run in runs for e in run.events if e["event"] == "train_step"]
    # Every step trained on groups sampled by the weights it had just sent to the engine
    # (with two ranks: gathered from both).
    assert all(e["sync/logprob_max_diff"] < 1e-3 for e in steps), [e["sync/logprob_max_diff"] for e in steps]
    assert {e["perf/ranks"] for e in steps} == {1, 2}
    assert prompts_per_step(*(run.events for run in runs)) == REFERENCE
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(
        range(STEPS)
    )
