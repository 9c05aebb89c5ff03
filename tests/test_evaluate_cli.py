"""scripts/evaluate.py: a saved model evaluated by real vLLM engines, the result alone
on stdout; bad input exits 2 naming the key."""

import json
import subprocess
import sys

import pytest

from tests.faults import REPO
from trainer import metrics as M

SCRIPT = str(REPO / "scripts" / "evaluate.py")


@pytest.mark.engine
def test_evaluate_prints_one_json_object_with_the_eval_metrics(tiny_model_path):
    done = subprocess.run(
        [
            sys.executable, SCRIPT, str(tiny_model_path), "--log-format", "json", "eval.prompts=5",
            "eval.samples=3", "eval.max_tokens=12", "eval.pass_threshold=0.2", "engine.max_model_len=256",
            "eval.task={name: python, factory: 'tests.helpers:LetterTask'}",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.splitlines()  # the result alone: every log line went to stderr
    result = json.loads(line)
    assert result["model"] == str(tiny_model_path)
    assert result[M.EVAL_PROMPTS] == 5 and result[M.EVAL_K] == 3
    assert 0 <= result[M.EVAL_PASS_AT_1] <= result[M.EVAL_PASS_AT_K] <= 1
    assert 0 < result[M.EVAL_REWARD_MEAN] < 1  # LetterTask: the share of "e"s, never all or none here
    assert 0 < result[M.EVAL_COMPLETION_LEN] <= 12
    events = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert any(e["event"] == "eval_done" for e in events)
    stopped = [e for e in events if e["event"] == "worker_stopped"]
    assert stopped and stopped[0]["eval_prompts"] == 5 and stopped[0]["groups"] == 0  # no training group


def test_evaluate_a_missing_model_exits_2_naming_it(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "nope"), "--log-format", "json"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    (event,) = [json.loads(x) for x in done.stderr.splitlines() if '"config_error"' in x]
    assert event["key"] == "model.path" and str(tmp_path / "nope") in event["error"]
