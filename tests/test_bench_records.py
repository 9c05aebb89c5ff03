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
