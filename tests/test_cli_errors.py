"""Bad config and bad input through the CLI: scripts/train.py in a subprocess must stop
before any engine starts, exit 2, and say why in exactly one `config_error` JSON event
that names the key (and the file and line for a dataset)."""

import json
import subprocess
import sys

import pytest

from tests.faults import REPO


def run_cli(tmp_path, *args, timeout=240):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--log-format", "json",
         f"run.output_dir={tmp_path / 'run'}", *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    return done, events


def write(path, text):
    path.write_text(text)
    return path


# id -> (args from (tmp_path, tiny model path), expected key, substrings of the message)
CASES = {
    "unknown_key": (
        lambda tmp, model: ["algo.grop_size=4"],
        "algo.grop_size",
        ["unknown config key 'algo.grop_size'", "did you mean 'algo.group_size'?",
         "Valid keys in [algo]: group_size, groups_per_step, max_staleness"],
    ),
    "unknown_section": (
        lambda tmp, model: ["engin.count=2"],
        "engin.count",
        ["unknown config section 'engin'", "did you mean 'engine'?", "Valid sections: model, run, algo"],
    ),
    "unknown_key_in_yaml": (
        lambda tmp, model: ["--config", str(write(tmp / "c.yaml", "gen:\n  max_token: 8\n"))],
        "gen.max_token",
        ["c.yaml: unknown config key 'gen.max_token'", "did you mean 'gen.max_tokens'?", "Valid keys in [gen]:"],
    ),
    "wrong_type": (
        lambda tmp, model: ["run.steps=three"],
        "run.steps",
        ["run.steps: expected int, got 'three' (str)"],
    ),
    "negative_staleness": (
        lambda tmp, model: ["algo.max_staleness=-1"],
        "algo.max_staleness",
        ['algo.max_staleness: must be >= 0 or "auto", got -1'],
    ),
    "group_size_1": (
        lambda tmp, model: ["algo.group_size=1"],
        "algo.group_size",
        ["algo.group_size: must be >= 2"],
    ),
    "missing_model_dir": (
        lambda tmp, model: [f"model.path={tmp / 'no-such-model'}"],
        "model.path",
        ["no-such-model: model directory does not exist"],
    ),
    "missing_dataset": (
        lambda tmp, model: [f"model.path={model}", "task.name=jsonl", f"task.path={tmp / 'missing.jsonl'}"],
        "task.path",
        ["missing.jsonl: cannot read the JSONL file: No such file or directory"],
    ),
    "malformed_jsonl_line": (
        lambda tmp, model: [
            f"model.path={model}", "task.name=jsonl",
            "task.path=" + str(write(tmp / "data.jsonl", '{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "2+2?", "answer": \n')),
        ],
        "task.path",
        ["data.jsonl:3: invalid JSON"],
    ),
    "jsonl_missing_field": (
        lambda tmp, model: [
            f"model.path={model}", "task.name=jsonl",
            "task.path=" + str(write(tmp / "data.jsonl", '{"prompt": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')),
        ],
        "task.prompt_field",
        ["data.jsonl:2: missing field 'prompt' (fields: question, answer)"],
    ),
    "overlong_prompt_with_overlong_error": (
        lambda tmp, model: [
            f"model.path={model}", "task.name=jsonl", "task.overlong=error", "engine.max_model_len=128",
            "gen.max_tokens=16",
            "task.path=" + str(write(tmp / "data.jsonl", '{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "'
                                     + "long " * 200 + '", "answer": "4"}\n')),
        ],
        "task.path",
        ["data.jsonl:3: prompt 1 has", "more than the 112 that fit (engine.max_model_len - gen.max_tokens)",
         "task.overlong=skip"],
    ),
    "unknown_reward_function_field": (
        lambda tmp, model: ["reward.functions=[{fn: task, wieght: 2}]"],
        "reward.functions[0].wieght",
        ["unknown field 'wieght' (did you mean 'weight'?)"],
    ),
    "unloadable_reward_function": (
        lambda tmp, model: [f"model.path={model}", "reward.functions=[{fn: 'tests.helpers:no_such_reward'}]"],
        "reward.functions[0].fn",
        ["cannot load 'tests.helpers:no_such_reward'"],
    ),
    "unpicklable_reward_for_process_executor": (
        lambda tmp, model: [
            f"model.path={model}", "task.name=python", "task.factory=tests.helpers:LetterTask", "reward.executor=process",
        ],
        "reward.executor",
        ["reward.executor=process: the reward functions must pickle"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_config_error_before_any_engine(tmp_path, tiny_model_path, case):
    make_args, key, fragments = CASES[case]
    done, events = run_cli(tmp_path, *make_args(tmp_path, tiny_model_path))
    assert done.returncode == 2, (done.returncode, events[-3:], done.stderr[-2000:])
    errors = [e for e in events if e["event"] == "config_error"]
    assert len(errors) == 1, events
    (error,) = errors
    assert error["level"] == "error"
    assert error["key"] == key
    for fragment in fragments:
        assert fragment in error["error"], error["error"]
    names = {e["event"] for e in events}
    assert not names & {"engines_ready", "worker_started", "run_failed", "run_done"}, names
    assert not any(e.get("logger", "").startswith("vllm.v1.engine") for e in events)  # no engine was built
    assert events[-1] is error  # the run's last word
    assert "Traceback" not in done.stderr
