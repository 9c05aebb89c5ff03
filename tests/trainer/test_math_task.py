"""task.name=math: gold answers, math-verify rewards (in threads and spawned processes too),
loading JSONL and parquet through datasets, errors naming file and line, where()."""

import concurrent.futures
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import threading

import math_verify
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.math_sample import GSM8K_GOLDS, GSM8K_ROWS, MATH_GOLDS, write_jsonl, write_math_sample
from trainer.config import TaskConfig, TrainerConfig
from trainer.errors import ConfigError, DataError
from trainer.tasks import JsonlTask, MathTask, Prompt, build_task, extract_gold_answer


@pytest.fixture
def sample(tmp_path):
    return write_math_sample(tmp_path / "sample")


def gsm8k(path):
    return MathTask(path, prompt_field="question", answer_field="answer")


def prompt_for(answer):
    return Prompt(index=0, text="q", answer=answer)


# ---- gold answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, gold",
    [
        ("3 * 12 = <<3*12=36>>36 muffins.\n#### 36", "36"),
        ("#### 1,234", "1234"),  # GSM8K's thousands commas
        ("#### 1,234,567", "1234567"),
        ("#### (1,2)", "(1,2)"),  # not a thousands comma: kept
        ("#### 3\nthen again\n#### 4", "4"),  # the last ####
        ("####   -5  ", "-5"),
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{1} at first, finally \\boxed{2}", "2"),  # the last box
        ("$\\boxed{\\{-2, 2\\}}$", "\\{-2, 2\\}"),  # escaped braces pair up too
        ("\\boxed {x^{2}}", "x^{2}"),
        ("  7 ", "7"),  # neither: the whole field
        ("\\frac{3}{4}", "\\frac{3}{4}"),
        ("", ""),
        ("#### ", ""),
    ],
)
def test_extract_gold_answer(solution, gold):
    assert extract_gold_answer(solution) == gold


def test_extract_gold_answer_unclosed_box_is_an_error():
    with pytest.raises(ValueError, match="closing brace"):
        extract_gold_answer("so \\boxed{\\frac{1}{2}")


# ---- loading --------------------------------------------------------------------------


def test_gsm8k_jsonl(sample):
    task = gsm8k(sample["gsm8k"])
    assert len(task) == 6
    assert [task.prompt(i).answer for i in range(6)] == GSM8K_GOLDS
    question = "A baker fills 3 trays with 12 muffins each. How many muffins does she bake?"
    assert task.prompt(0) == Prompt(
        index=0,
        text=question + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
        answer="36",
    )
    assert task.prompt(7) == Prompt(index=7, text=task.prompt(1).text, answer="42")  # 7 % 6 == 1, index kept


def test_parquet_reads_like_the_jsonl(sample):
    from_parquet, from_jsonl = gsm8k(sample["parquet"]), gsm8k(sample["gsm8k"])
    assert len(from_parquet) == 6
    assert [from_parquet.prompt(i) for i in range(8)] == [from_jsonl.prompt(i) for i in range(8)]


def test_math_jsonl(sample):
    task = MathTask(sample["math"], prompt_field="problem", answer_field="solution")
    assert [task.prompt(i).answer for i in range(len(task))] == MATH_GOLDS
    assert task.prompt(1).text.startswith("Compute $7 \\times 6$.\n")


def test_a_json_extension_reads_as_jsonl(tmp_path):
    task = gsm8k(write_jsonl(tmp_path / "data.json", GSM8K_ROWS[:2]))
    assert [task.prompt(i).answer for i in range(2)] == ["36", "42"]


def test_a_rewritten_file_is_not_served_from_a_stale_cache(tmp_path):
    # datasets fingerprints a local file by path and mtime: same name, same size, same
    # mtime, new content must still read the new content.
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}])
    assert gsm8k(path).prompt(0).answer == "1"
    before = os.stat(path)
    write_jsonl(path, [{"question": "q", "answer": "#### 2"}])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert gsm8k(path).prompt(0).answer == "2"


def test_glob_characters_in_the_path_name_that_file(tmp_path):
    # datasets takes data_files as glob patterns: "a[1].jsonl" would read "a1.jsonl".
    write_jsonl(tmp_path / "a1.jsonl", [{"question": "wrong", "answer": "#### 1"}])
    path = write_jsonl(tmp_path / "a[1].jsonl", [{"question": "right", "answer": "#### 2"}])
    assert gsm8k(path).prompt(0).answer == "2"


def test_loading_leaves_no_cache_behind_and_stays_offline(sample, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    gsm8k(sample["parquet"])
    gsm8k(sample["gsm8k"])
    assert list(tmp.iterdir()) == []
    assert os.environ.get("HF_DATASETS_OFFLINE") is not None


def test_importing_tasks_does_not_import_datasets_or_math_verify():
    code = "import sys, trainer.tasks; print('datasets' in sys.modules, 'math_verify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- where ----------------------------------------------------------------------------


def test_jsonl_task_where_names_file_and_line(tmp_path):
    row = json.dumps({"prompt": "q", "answer": "a"})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{row}\n\n{row}\n  \n{row}\n")
    task = JsonlTask(path)
    assert [task.where(i) for i in range(4)] == [f"{path}:1", f"{path}:3", f"{path}:5", f"{path}:1"]


def test_math_task_where_names_line_or_row(sample, tmp_path):
    row = json.dumps(GSM8K_ROWS[0])
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{row}\n\n{row}\n")
    task = gsm8k(path)
    assert [task.where(i) for i in range(3)] == [f"{path}:2", f"{path}:4", f"{path}:2"]
    task = gsm8k(sample["parquet"])
    assert [task.where(i) for i in (0, 5, 6, 13)] == [f"{sample['parquet']}:row {n}" for n in (0, 5, 0, 1)]


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, key, message",
    [
        ('{"question": "q", "answer": ', "task.path", "invalid JSON: Expecting value (column 29)"),
        ('["q", "#### 1"]', "task.path", "expected a JSON object, got list"),
        ('{"question": "q"}', "task.answer_field", "missing field 'answer' (fields: question)"),
        ('{"answer": "#### 1"}', "task.prompt_field", "missing field 'question' (fields: answer)"),
        ('{"question": "q", "answer": 42}', "task.answer_field", "field 'answer' must be a string, got int 42"),
        ('{"question": "q", "answer": "#### "}', "task.answer_field", "field 'answer' holds no answer: '#### '"),
        ('{"question": "q", "answer": "  "}', "task.answer_field", "field 'answer' holds no answer: '  '"),
        (
            '{"question": "q", "answer": "\\\\boxed{\\\\frac{1}{2}"}',
            "task.answer_field",
            "field 'answer': \\boxed{ without its closing brace",
        ),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path, bad_line, key, message):
    good = json.dumps(GSM8K_ROWS[0])
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert (e.value.path, e.value.line, e.value.key) == (str(path), 4, key)
    assert str(e.value) == f"{path}:4: {message}"


def write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    "answers, key, message",
    [
        (["#### 1", None, "#### 3"], "task.answer_field", "row 1: field 'answer' must be a string, got NoneType None"),
        (["#### 1", "#### 2", "####"], "task.answer_field", "row 2: field 'answer' holds no answer: '####'"),
    ],
)
def test_parquet_bad_row_names_file_and_row(tmp_path, answers, key, message):
    path = write_parquet(tmp_path / "data.parquet", {"question": ["a", "b", "c"], "answer": answers})
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert (e.value.key, e.value.line) == (key, None)
    assert str(e.value) == f"{path}: {message}"


def test_parquet_missing_column(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", {"question": ["a"], "answer": ["#### 1"]})
    with pytest.raises(DataError) as e:
        MathTask(path, prompt_field="question", answer_field="solution")
    assert e.value.key == "task.answer_field"
    assert str(e.value) == f"{path}: missing column 'solution' (columns: question, answer)"


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")])
def test_empty_jsonl_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert str(e.value) == f"{path}: the JSONL file has no rows"


def test_empty_parquet_is_an_error(tmp_path):
    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": [], "answer": []}, schema=schema), path)
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert str(e.value) == f"{path}: the parquet file has no rows"


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope.jsonl", "cannot read the JSONL file: No such file or directory"),
        ("nope.parquet", "cannot read the parquet file: No such file or directory"),
    ],
)
def test_missing_file_is_a_data_error(tmp_path, name, message):
    path = tmp_path / name
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert (str(e.value), e.value.key) == (f"{path}: {message}", "task.path")


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("not parquet at all\n")
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert e.value.key == "task.path"
    assert str(e.value).startswith(f"{path}: not a parquet file: ")


def test_unrelated_fields_of_mixed_types_still_load(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"question": "a", "answer": "#### 1", "meta": {"x": 1}}, {"question": "b", "answer": "#### 2", "meta": "s"}],
    )
    assert [gsm8k(path).prompt(i).answer for i in range(2)] == ["1", "2"]


def test_a_datasets_error_is_a_data_error_naming_its_cause(tmp_path, monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        try:
            raise ValueError("the reader's own words")
        except ValueError as e:
            raise RuntimeError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", fail)
    path = write_jsonl(tmp_path / "data.jsonl", GSM8K_ROWS[:1])
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert e.value.key == "task.path"
    assert str(e.value) == f"{path}: cannot load with datasets: ValueError: the reader's own words"


def test_unknown_extension_is_a_data_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\nq,1\n")
    with pytest.raises(DataError) as e:
        gsm8k(path)
    assert e.value.key == "task.path"
    assert str(e.value) == f"{path}: expected a .jsonl, .json or .parquet file, got '.csv'"


# ---- reward ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, reward",
    [
        ("3 trays of 12 is 36, plus 6 is 42, so the answer is \\boxed{42}", "42", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # equal values, different forms
        ("The sum is $\\frac{2}{4}$.", "\\frac{1}{2}", 1.0),  # no box: the last LaTeX answer
        ("The final answer is 1234.", "1234", 1.0),  # no box: the last number
        ("\\boxed{-5}", "-5", 1.0),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
        ("\\boxed{\\{2, -2\\}}", "\\{-2, 2\\}", 1.0),  # sets ignore order
        ("\\boxed{41}", "42", 0.0),
        ("\\boxed{42} is wrong, it is \\boxed{43}", "42", 0.0),  # the last answer counts
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
        ("}}{{ \\frac{ !!! $$ \\boxed{", "42", 0.0),  # garbage
        ("", "42", 0.0),
    ],
)
def test_reward(completion, gold, reward):
    task = MathTask.__new__(MathTask)  # reward reads only the prompt: no file needed
    assert task.reward(completion, prompt_for(gold)) == reward


def test_reward_of_each_rows_own_answer_is_one(sample):
    for task in (gsm8k(sample["gsm8k"]), MathTask(sample["math"], prompt_field="problem", answer_field="solution")):
        prompts = [task.prompt(i) for i in range(len(task))]
        for p in prompts:
            assert task.reward(f"So the answer is $\\boxed{{{p.answer}}}$.", p) == 1.0
        for p, other in zip(prompts, prompts[1:] + prompts[:1]):  # the golds are all different
            assert task.reward(f"\\boxed{{{other.answer}}}", p) == 0.0


def test_reward_works_outside_the_main_thread(sample):
    """math-verify's default timeouts use signal.alarm, which raises in any other thread;
    the reward turns them off, so it still scores there."""
    task = gsm8k(sample["gsm8k"])
    results, errors = [], []

    def score():
        results.append(task.reward("\\boxed{36}", task.prompt(0)))
        results.append(task.reward("\\boxed{35}", task.prompt(0)))
        try:
            math_verify.parse("$1$")  # the default: what the reward must not do
        except ValueError as e:
            errors.append(str(e))

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=60)
    assert results == [1.0, 0.0]
    assert errors and "threaded environment" in errors[0]  # the pitfall is real


def test_pickle_round_trip(sample):
    for path in (sample["gsm8k"], sample["parquet"]):
        task = gsm8k(path)
        copy = pickle.loads(pickle.dumps(task))
        assert [copy.prompt(i) for i in range(7)] == [task.prompt(i) for i in range(7)]
        assert copy.where(3) == task.where(3)
        assert copy.reward("\\boxed{42}", copy.prompt(1)) == 1.0


def test_reward_in_a_spawned_process(sample):
    task = gsm8k(sample["parquet"])
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        right = pool.submit(task.reward, "\\boxed{1234}", task.prompt(2))
        wrong = pool.submit(task.reward, "\\boxed{1235}", task.prompt(2))
        assert (right.result(timeout=120), wrong.result(timeout=120)) == (1.0, 0.0)


# ---- build_task and config ------------------------------------------------------------


def test_build_task(sample):
    task = build_task(TaskConfig(name="math", path=str(sample["gsm8k"]), prompt_field="question"), seed=0)
    assert isinstance(task, MathTask)
    assert task.prompt(2).answer == "1234"


def test_config_requires_a_path_for_math():
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["task.name=math"])
    assert e.value.key == "task.path"
    assert "is required when task.name is jsonl or math" in str(e.value)
    cfg = TrainerConfig.load(None, ["task.name=math", "task.path=gsm8k.parquet", "task.prompt_field=question"])
    assert (cfg.task.name, cfg.task.path) == ("math", "gsm8k.parquet")
