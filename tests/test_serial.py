"""tests/conftest.py's order and exclusion, in a pytest run of its own on two xdist
workers scheduled as `make test` schedules them: a test marked `serial` overlaps no
other test, and a worker runs the serial tests it is given before the others."""

import json
import subprocess
import sys
import textwrap

from tests.faults import REPO

TEST_FILE = """
import json, os, time
import pytest

def record(name):
    start = time.time()
    time.sleep(0.3)
    with open(os.environ["INTERVALS"], "a") as f:
        f.write(json.dumps([name, start, time.time(), os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")

@pytest.mark.parametrize("i", range(8))
def test_shared(i):
    record(f"shared{i}")

@pytest.mark.serial
@pytest.mark.parametrize("i", range(3))
def test_alone(i):
    record(f"serial{i}")
"""


def test_a_serial_test_runs_alone_and_first_on_its_worker(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_intervals.py").write_text(TEST_FILE)
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        markers =
            serial: runs alone
            engine: starts an engine
        """))
    intervals = tmp_path / "intervals.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "worksteal", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"INTERVALS": str(intervals), "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [json.loads(line) for line in intervals.read_text().splitlines()]  # [name, start, end, worker]
    assert sorted(r[0] for r in runs) == sorted([f"shared{i}" for i in range(8)] + [f"serial{i}" for i in range(3)])
    for name, start, end, _ in runs:
        if name.startswith("serial"):
            overlapping = [other for other, s, e, _ in runs if other != name and s < end and start < e]
            assert overlapping == [], (name, overlapping)
    for worker in {r[3] for r in runs}:
        serial_first = [r[0].startswith("serial") for r in sorted(runs, key=lambda r: r[1]) if r[3] == worker]
        assert serial_first == sorted(serial_first, reverse=True), (worker, serial_first)
    # Two workers really ran the shared tests side by side.
    shared = sorted((s, e) for name, s, e, _ in runs if name.startswith("shared"))
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(shared, shared[1:]))
    assert list(tmp_path.glob("pytest-*.room")) == []  # the lock files (in TMPDIR) are gone
