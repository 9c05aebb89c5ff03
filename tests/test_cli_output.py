"""The CLI's output on a real short run (tiny model, real vLLM engine): every stdout line
is one JSON object, the engine processes' records included; every step's metrics are in
the `train_step` event and in metrics.jsonl; metrics.png is written at the end."""

import datetime
import json
import subprocess
import sys
import time

import pytest
import torch

from tests.faults import REPO
from tests.helpers import alive, tmp_leftovers
from trainer import metrics as M
from workers.hardware import bf16_native
from workers import shm
from workers.shm import PREFIX, SHM_DIR

pytestmark = pytest.mark.engine

REQUIRED_METRICS = [
    "reward/mean", "reward/std", "reward/frac_zero_std_groups",
    "loss/policy", "loss/clip_frac", "loss/is_ratio_max", "loss/is_capped_frac",
    "completion/mean_len", "completion/clipped_frac",
    "capacity/free", "capacity/in_flight", "capacity/queued",
    "staleness/mean", "staleness/max",
    "perf/gen_tokens_per_s", "perf/step_s", "perf/trainer_idle_frac", "perf/weight_sync_s",
]


def test_metric_names_have_one_home():
    assert set(REQUIRED_METRICS) <= set(M.STEP_RECORD_KEYS)
    assert M.LOSS_IS_CAPPED_FRAC == "loss/is_capped_frac"


@pytest.mark.serial  # every file in /dev/shm and /tmp before and after
def test_short_run_logs_only_json_and_every_metric(tmp_path, tiny_model_path):
    run_dir = tmp_path / "run"
    segments_before, tmp_before = shm.segments(), tmp_leftovers()
    done = subprocess.run(
        [
            sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json",
            f"model.path={tiny_model_path}", f"run.output_dir={run_dir}", "run.steps=2",
            "algo.group_size=4", "algo.groups_per_step=2", "gen.max_tokens=8", "engine.max_model_len=256",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=480,
    )
    lines = done.stdout.splitlines()
    events = []
    for n, line in enumerate(lines, start=1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stdout line {n} is not JSON: {line[:300]!r}")
    assert done.returncode == 0, (events[-3:], done.stderr[-3000:])
    # stderr too: what the processes write to fd 2 (native warnings, Python warnings,
    # progress bars) arrives as JSON records from the launcher's relay.
    for n, line in enumerate(done.stderr.splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {n} is not JSON: {line[:300]!r}")
        assert isinstance(record, dict) and {"timestamp", "level", "event"} <= set(record), record

    for e in events:
        assert isinstance(e, dict), e
        assert {"timestamp", "level", "event", "thread"} <= set(e), e
        ts = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        assert e["timestamp"].endswith("Z") and ts.utcoffset() == datetime.timedelta(0), e
        assert e["level"] in {"debug", "info", "warning", "error", "critical"}, e

    # The trainer's own records carry the run id (bound for the whole fit()).
    trainer_records = [e for e in events if e.get("logger", "").startswith(("trainer.", "workers."))]
    assert trainer_records
    run_ids = {e.get("run_id") for e in trainer_records}
    assert len(run_ids) == 1 and None not in run_ids, run_ids
    assert events[-1]["event"] == "run_done" and events[-1]["run_id"] in run_ids

    # vLLM's spawned processes (EngineCore and its worker) log JSON lines too.
    (started,) = [e for e in events if e["event"] == "worker_started"]
    engine_pids = started["engine_pids"]
    from_engines = [e for e in events if e.get("pid") in engine_pids]
    assert from_engines, "no record from an engine process"
    assert {e["process"] for e in from_engines} & {"EngineCore", "EngineCore_DP0"}, {e["process"] for e in from_engines}
    assert all(e["logger"].startswith("vllm") for e in from_engines)

    # engine.dtype=auto: bfloat16 only where the CPU computes it natively (workers/hardware.py).
    (ready,) = [e for e in events if e["event"] == "engines_ready"]
    assert ready["engine_dtype"] == ("torch.bfloat16" if bf16_native(torch.device("cpu")) else "torch.float32")
    # algo.max_staleness=auto: the CPU engine shares the trainer's cores, so it is 0.
    assert ready["max_staleness"] == 0

    # Overlaps: the policy loads (`setup`) while the engine starts; at the end (no
    # evaluation follows) the engines stop once the last step has its batch, so they shut
    # down during that step, which syncs no weights.
    names = [e["event"] for e in events]
    (setup,) = [e for e in events if e["event"] == "setup"]
    assert setup["malloc_keeps_freed"] is True  # a CPU trainer keeps the memory it frees
    assert names.index("engine_starting") < names.index("setup") < names.index("engines_ready")
    last_step = len(names) - 1 - names[::-1].index("train_step")
    assert names.index("workers_stopping") < last_step < names.index("checkpoint_saved")

    steps = [e for e in events if e["event"] == "train_step"]
    assert [e[M.STEP] for e in steps] == [0, 1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r[M.STEP] for r in records] == [0, 1]
    # The random tiny model solves no sum: every group has all rewards 0. Dynamic sampling
    # (on by default) released its budget (2 x 2 groups per step) before batching any,
    # then let them train, so the run stepped instead of waiting out run.batch_timeout_s.
    assert [r[M.REWARD_FRAC_ZERO_STD_GROUPS] for r in records] == [1.0, 1.0]
    assert [r[M.STALENESS_MAX] for r in records] == [0, 0]
    filtered = [r[M.REWARD_FILTERED_GROUPS] for r in records]
    assert 4 <= filtered[0] <= filtered[1] <= 4 * 3, filtered
    for record in steps + records:
        missing = [k for k in M.STEP_RECORD_KEYS if k not in record]
        assert not missing, missing
        assert all(
            isinstance(record[k], (int, float)) or (k in M.NULLABLE_KEYS and record[k] is None)
            for k in M.STEP_RECORD_KEYS
        ), record

    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(e["event"] == "metrics_plotted" and e["path"] == str(png) for e in events)
    assert events[-1]["event"] == "run_done"
    # The engine's processes were killed at once by PID (Engine.shutdown), not by vLLM's
    # SIGKILL 5 s after its SIGTERM; their shared memory went with them, and the
    # resource tracker had nothing left to warn about.
    assert not [e for e in events if "force killing" in e["event"]]
    assert not [line for line in done.stderr.splitlines() if "resource_tracker" in line]
    time.sleep(0.2)
    assert alive(engine_pids) == []
    assert not list(SHM_DIR.glob(f"{PREFIX}*")), "the weights' shared memory outlived the run"
    assert shm.segments() - segments_before == set(), "the engine's shared memory outlived the run"
    assert tmp_leftovers() - tmp_before == set(), "the engine's sockets or FileStore outlived the run"
