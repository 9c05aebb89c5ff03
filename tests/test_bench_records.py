"""scripts/bench_time_to_quality.py keeps every finished run and, with --reuse, takes a
recorded run of the same job on the same machine instead of running it again; with
--deadline-s it starts no run past its deadline. What a run trains is not under test
here (a run is hours of SmolLM2): run_one is replaced by a function that counts calls."""

import json
import sys

import pytest

from scripts import bench_time_to_quality as ttq


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """Run the script's main() with arguments; returns (runs started, report body)."""
    monkeypatch.setattr(ttq, "RUNS", tmp_path / "runs.jsonl")
    reports, started = [], []

    def run_one(name, overrides, seed, args, out_dir):
        started.append((name, seed))
        return {"seed": seed, "curve": [(10.0, 0.2), (20.0 + seed, 0.85), (30.0, 0.95)], "wall_s": 40.0,
                "step_s": 2.0, "train_s": 1.5, "rows": 16.0, "tokens_per_s": 100.0}

    monkeypatch.setattr(ttq, "run_one", run_one)
    monkeypatch.setattr(ttq, "record", lambda name, body: reports.append(body))
    monkeypatch.setattr(ttq, "plot", lambda results, path: None)

    def main(*argv):
        started.clear()
        monkeypatch.setattr(sys, "argv", ["bench_time_to_quality.py", "--png", str(tmp_path / "x.png"), *argv])
        ttq.main()
        return list(started), reports[-1]

    return main


def test_runs_are_recorded_and_reused_on_the_same_machine(bench, tmp_path):
    args = ["--variants", "default", "staleness0", "--seeds", "0", "1", "--steps", "3"]
    started, _ = bench(*args, "--reuse")
    assert started == [("default", 0), ("staleness0", 0), ("default", 1), ("staleness0", 1)]
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["job"]["variant"], r["job"]["seed"]) for r in lines] == started
    assert lines[1]["job"]["overrides"] == ["algo.max_staleness=0"]
    assert lines[0]["job"]["machine"] == ttq.machine() and lines[0]["commit"]

    started, body = bench(*args, "--reuse")
    assert started == []  # every run recorded
    assert body.count("(recorded ") == 4
    assert "| default | (defaults) | 0 1 |" in body
    assert "20 (20-21)" in body  # s to 0.8 over the two recorded seeds

    started, _ = bench(*args)  # without --reuse every run runs again, and is recorded again
    assert len(started) == 4 and len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8

    # Another machine's run (or another job length) is not this one's.
    text = (tmp_path / "runs.jsonl").read_text().replace(ttq.machine(), "another CPU, 2 cores, bfloat16 native")
    (tmp_path / "runs.jsonl").write_text(text)
    started, _ = bench(*args, "--reuse")
    assert len(started) == 4
    started, _ = bench("--variants", "default", "--seeds", "0", "--steps", "4", "--reuse")
    assert started == [("default", 0)]


def test_a_changed_default_is_another_job_and_a_new_setting_is_not(bench, tmp_path):
    runs = tmp_path / "runs.jsonl"
    bench("--variants", "default", "--seeds", "0", "--steps", "3")
    record = json.loads(runs.read_text())
    assert record["job"]["config"]["algo.max_staleness"] == ttq.TrainerConfig().algo.max_staleness
    # A run recorded before a setting existed (its default keeps what runs did then).
    del record["job"]["config"]["algo.clip_against"]
    runs.write_text(json.dumps(record) + "\n")
    assert bench("--variants", "default", "--seeds", "0", "--steps", "3", "--reuse")[0] == []
    # A run recorded under another default of a setting that decides what it learns
    # (max_staleness was 1 before "auto").
    record["job"]["config"]["algo.max_staleness"] = 1
    runs.write_text(json.dumps(record) + "\n")
    assert bench("--variants", "default", "--seeds", "0", "--steps", "3", "--reuse")[0] == [("default", 0)]


def test_deadline_reports_what_ran_or_was_recorded(bench):
    bench("--variants", "default", "--seeds", "0", "--steps", "3")
    started, body = bench("--variants", "default", "staleness0", "--seeds", "0", "1", "--steps", "3",
                          "--reuse", "--deadline-s", "0")
    assert started == []  # seed 0 of default recorded; nothing starts past a deadline of 0 s
    assert "| default | (defaults) | 0 |" in body and "staleness0" not in body.split("Held-out")[0]
    assert "3 runs of the 4 asked for did not start (--deadline-s)." in body
    with pytest.raises(SystemExit, match="nothing to report"):
        bench("--variants", "staleness0", "--seeds", "0", "--steps", "3", "--reuse", "--deadline-s", "0")


def test_a_run_record_keeps_what_a_decline_is_read_from(tmp_path, monkeypatch):
    """run_one's record of a finished run: accuracy against training time (evaluation
    time taken out), and per step the entropy, rows trained and gradient norm that
    README's "Late-run declines" reads. The metrics file is what scripts/train.py writes;
    the subprocess that would write it is replaced."""
    from trainer import metrics as M

    evals = [
        {M.STEP: 0, M.EVAL_PASS_AT_1: 0.25, M.EVAL_PASS_AT_K: 0.5, M.PERF_EVAL_S: 4.0, M.PERF_ELAPSED_S: 10.0},
        {M.STEP: 2, M.EVAL_PASS_AT_1: 0.75, M.EVAL_PASS_AT_K: 1.0, M.PERF_EVAL_S: 4.0, M.PERF_ELAPSED_S: 40.0},
    ]
    steps = [
        {M.STEP: 0, M.PERF_STEP_S: 10.0, M.PERF_TRAIN_S: 6.0, M.PERF_TRAIN_ROWS: 32, M.PERF_TRAIN_TOKENS_PER_S: 300.0,
         M.LOSS_ENTROPY: 2.5, M.LOSS_GRAD_NORM: 3.0},
        {M.STEP: 1, M.PERF_STEP_S: 12.0, M.PERF_TRAIN_S: 2.0, M.PERF_TRAIN_ROWS: 8, M.PERF_TRAIN_TOKENS_PER_S: 200.0,
         M.LOSS_ENTROPY: 0.1, M.LOSS_GRAD_NORM: 14.0},
    ]
    assert all(M.is_eval_record(e) for e in evals) and not any(M.is_eval_record(s) for s in steps)

    def run(cmd, **kwargs):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [evals[0], *steps, evals[1]]))
        return ttq.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ttq.subprocess, "run", run)
    args = ttq.argparse.Namespace(model="tiny", steps=2, eval_every=2, eval_prompts=4, eval_samples=2)
    got = ttq.run_one("default", [], 0, args, tmp_path)
    assert got["curve"] == [(6.0, 0.25), (32.0, 0.75)]  # elapsed minus the evaluations so far
    assert (got["step_s"], got["train_s"], got["rows"], got["tokens_per_s"]) == (11.0, 4.0, 20.0, 250.0)
    assert got["entropy"] == [2.5, 0.1] and got["pass_at_k"] == [0.5, 1.0]
    assert got["step_rows"] == [32, 8] and got["grad_norm"] == [3.0, 14.0]
