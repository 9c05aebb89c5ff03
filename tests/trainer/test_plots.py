"""trainer.plots and scripts/plot_metrics.py on a synthetic metrics.jsonl (no engine)."""

import json
import math
import subprocess
import sys

import pytest

from trainer import metrics as M
from trainer.plots import DPI, FIGSIZE_IN, PANELS, plot_run, read_metrics
from tests.faults import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI))  # (width, height)


def record(step):
    r = {name: 0.0 for name in M.STEP_RECORD_KEYS}
    r.update({
        M.STEP: step,
        M.POLICY_VERSION: step + 1,
        M.REWARD_MEAN: step / 10,
        M.REWARD_STD: 0.3,
        M.LOSS_POLICY: math.sin(step),
        M.STALENESS_MEAN: step % 2 * 0.5,
        M.STALENESS_MAX: step % 2,
        M.PERF_GEN_TOKENS_PER_S: 100.0 + step,
        M.PERF_STEP_S: 2.0,
    })
    return r


def write_run(run_dir, records, extra_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def assert_png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == EXPECTED_SIZE
        # Not a blank canvas: the lines and text put many colours in it.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_panels_plot_the_required_metrics():
    plotted = {name for _, _, left, _, right in PANELS for name, _ in left + right}
    for name in (M.REWARD_MEAN, M.LOSS_POLICY, M.STALENESS_MEAN, M.STALENESS_MAX, M.PERF_GEN_TOKENS_PER_S):
        assert name in plotted


def test_plot_run_writes_a_valid_png(tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(s) for s in range(12)])
    out = plot_run(run)
    assert out == run / "metrics.png"
    assert_png(out)
    assert not (run / "metrics.png.tmp").exists()


def test_a_single_step_and_missing_metrics_still_plot(tmp_path):
    run = tmp_path / "run"
    write_run(run, [{M.STEP: 0, M.REWARD_MEAN: 0.5}])  # an older run without most metrics
    assert_png(plot_run(run))


def test_resumed_steps_keep_the_last_record_and_bad_lines_are_skipped(tmp_path):
    run = tmp_path / "run"
    first, again = record(1), record(1)
    again[M.REWARD_MEAN] = 0.99
    write_run(run, [record(0), first, again, record(2)], extra_lines=['{"step": 3, "reward/me'])
    records = read_metrics(run / "metrics.jsonl")
    assert [r[M.STEP] for r in records] == [0, 1, 2]
    assert records[1][M.REWARD_MEAN] == 0.99


def test_no_records_is_an_error(tmp_path):
    run = tmp_path / "run"
    write_run(run, [], extra_lines=["not json"])
    with pytest.raises(ValueError, match="no step records"):
        plot_run(run)
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path / "nowhere")


def test_cli_writes_the_png_and_prints_its_path(tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(s) for s in range(3)])
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(run)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run / "metrics.png")
    assert_png(run / "metrics.png")

    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path / "nowhere")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert missing.returncode == 2
    assert "metrics.jsonl" in missing.stderr
