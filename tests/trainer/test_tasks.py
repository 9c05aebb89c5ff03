"""Tasks: deterministic prompts by index, rewards, JSONL validation, prompt rendering."""

import json
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainer.config import TaskConfig, TrainerConfig
from trainer.errors import ConfigError, DataError
from trainer.tasks import ArithmeticTask, JsonlTask, Prompt, build_task, render_prompt

# ---- arithmetic -----------------------------------------------------------------------


def test_arithmetic_prompt_is_deterministic_per_seed_and_index():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert [a.prompt(i) for i in range(20)] == [b.prompt(i) for i in range(20)]
    # Out of order gives the same prompt: resume from a cursor needs no replay.
    assert a.prompt(17) == ArithmeticTask(seed=3).prompt(17)
    other_seed = [ArithmeticTask(seed=4).prompt(i).text for i in range(20)]
    assert other_seed != [p.text for p in (a.prompt(i) for i in range(20))]


def test_arithmetic_prompt_is_stable_across_versions():
    # Pinned: a change here silently changes every run's data (and resumed runs).
    p = ArithmeticTask(seed=0, max_operand=50).prompt(0)
    assert p == Prompt(index=0, text="What is 20 + 35? Answer with just the number.", answer="55")


def test_arithmetic_answers_are_correct_and_in_range():
    task = ArithmeticTask(seed=1, max_operand=9)
    ops = set()
    for i in range(300):
        p = task.prompt(i)
        m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Answer with just the number\.", p.text)
        assert m, p.text
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert int(p.answer) == (a + b if op == "+" else a - b)
        assert int(p.answer) >= 0
        assert p.index == i
        ops.add(op)
    assert ops == {"+", "-"}


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("42", 1.0),
        (" 42\n", 1.0),
        ("The answer is 42.", 1.0),
        ("17 + 25 = 42", 1.0),  # the last number counts, not the first
        ("42.0", 1.0),
        ("42, final answer: 43", 0.0),
        ("41", 0.0),
        ("420", 0.0),
        ("-42", 0.0),
        ("forty-two", 0.0),
        ("", 0.0),
    ],
)
def test_arithmetic_reward_is_the_last_number(completion, reward):
    prompt = Prompt(index=0, text="What is 17 + 25? Answer with just the number.", answer="42")
    assert ArithmeticTask().reward(completion, prompt) == reward


def test_arithmetic_reward_of_the_prompts_own_answer_is_one():
    task = ArithmeticTask(seed=5)
    for i in range(50):
        p = task.prompt(i)
        assert task.reward(p.answer, p) == 1.0
        assert task.reward(str(int(p.answer) + 1), p) == 0.0


# ---- JSONL ----------------------------------------------------------------------------


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_rows_and_wrap_around(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(3)]
    path = write_jsonl(tmp_path, [json.dumps(r) for r in rows[:2]] + ["", "  "] + [json.dumps(rows[2])])
    task = JsonlTask(path)
    assert len(task) == 3  # blank lines skipped
    assert task.prompt(1) == Prompt(index=1, text="q1", answer="a1")
    assert task.prompt(2) == Prompt(index=2, text="q2", answer="a2")
    assert task.prompt(4) == Prompt(index=4, text="q1", answer="a1")  # 4 % 3 == 1, index kept


def test_jsonl_custom_fields(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"question": "2+2?", "solution": "4"})])
    task = JsonlTask(path, prompt_field="question", answer_field="solution")
    assert task.prompt(0) == Prompt(index=0, text="2+2?", answer="4")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "q", "answer": ', "invalid JSON: Expecting value (column 27)"),
        ('["q", "a"]', "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
        ('{"prompt": "q"}', "missing field 'answer' (fields: prompt)"),
        ('{"answer": "a"}', "missing field 'prompt' (fields: answer)"),
        ('{"prompt": "q", "answer": 4}', "field 'answer' must be a string, got int 4"),
        ('{"prompt": null, "answer": "a"}', "field 'prompt' must be a string, got NoneType None"),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "q", "answer": "a"})
    path = write_jsonl(tmp_path, [good, "", good, bad_line, good])
    with pytest.raises(DataError) as e:
        JsonlTask(path)
    assert (e.value.path, e.value.line) == (path, 4)  # 1-based, blank lines counted
    assert str(e.value) == f"{path}:4: {message}"


def test_jsonl_missing_field_points_at_the_config_key(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"prompt": "q", "answer": "a"})])
    with pytest.raises(DataError) as e:
        JsonlTask(path, answer_field="label")
    assert e.value.key == "task.answer_field"


def test_jsonl_not_utf8_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "q", "answer": "a"}\n{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(DataError) as e:
        JsonlTask(path)
    assert e.value.line == 2
    assert "not UTF-8" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        JsonlTask(path)
    assert str(e.value) == f"{path}: the JSONL file has no rows"
    assert e.value.line is None


def test_jsonl_missing_file_is_a_data_error(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as e:
        JsonlTask(path)
    assert str(e.value) == f"{path}: cannot read the JSONL file: No such file or directory"
    assert e.value.key == "task.path"


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("Paris", "Paris", 1.0),
        ("  paris.  ", "Paris", 1.0),  # case, spaces, final punctuation
        ('"Paris"', "Paris", 1.0),  # quotes
        ("The capital of France is Paris.", "Paris", 1.0),  # the answer ends the completion
        ("The capital is\nNew   York!", "new york", 1.0),  # whitespace collapsed
        ("x = 42", "42", 1.0),  # "=" is a word boundary
        ("142", "42", 0.0),  # not on a word boundary
        ("Paris is the capital", "Paris", 0.0),  # the answer must come last
        ("Lyon", "Paris", 0.0),
        ("", "Paris", 0.0),
        ("anything", "", 0.0),  # an empty answer matches nothing
    ],
)
def test_jsonl_reward_completion_ends_with_answer(tmp_path, completion, answer, reward):
    task = JsonlTask(write_jsonl(tmp_path, [json.dumps({"prompt": "q", "answer": answer})]))
    assert task.reward(completion, task.prompt(0)) == reward


# ---- build_task -----------------------------------------------------------------------


def test_build_task_from_config(tmp_path):
    task = build_task(TaskConfig(max_operand=5), seed=2)
    assert isinstance(task, ArithmeticTask)
    assert task.prompt(3) == ArithmeticTask(seed=2, max_operand=5).prompt(3)

    path = write_jsonl(tmp_path, [json.dumps({"q": "hi", "a": "yo"})])
    task = build_task(TaskConfig(name="jsonl", path=path, prompt_field="q", answer_field="a"), seed=0)
    assert isinstance(task, JsonlTask)
    assert task.prompt(0) == Prompt(index=0, text="hi", answer="yo")


# ---- render_prompt --------------------------------------------------------------------


def word_tokenizer(chat_template=None):
    """A real transformers tokenizer over a whitespace word vocabulary: no files, no download."""
    words = ["[UNK]", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "What", "is", "2", "+", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_render_prompt_applies_the_chat_template_with_generation_prompt():
    template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    ids = render_prompt(word_tokenizer(template), Prompt(index=0, text="What is 2 + 2 ?", answer="4"))
    # <|im_start|>=2 user=4 What=6 is=7 2=8 +=9 2=8 ?=10 <|im_end|>=3 <|im_start|>=2 assistant=5
    assert ids == [2, 4, 6, 7, 8, 9, 8, 10, 3, 2, 5]


def test_render_prompt_without_template_is_the_plain_text():
    ids = render_prompt(word_tokenizer(), Prompt(index=0, text="What is 2 + 2 ?", answer="4"))
    assert ids == [6, 7, 8, 9, 8, 10]


def test_render_prompt_with_smollm2_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)  # SmolLM2's tokenizer
    prompt = ArithmeticTask().prompt(0)
    ids = render_prompt(tokenizer, prompt)
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|im_start|>user\n{prompt.text}<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2's BOS is <|im_start|>: it must open the text once, not twice.
    assert text.startswith("<|im_start|>system\n")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_python_task_factory_loads_the_named_callable():
    from tests.helpers import LetterTask

    task = build_task(TaskConfig(name="python", factory="tests.helpers:LetterTask"), seed=0)
    assert isinstance(task, LetterTask)
    assert task.reward("eee", task.prompt(0)) == 1.0


@pytest.mark.parametrize("factory", ["tests.helpers:NoSuchThing", "no_such_module:Task"])
def test_python_task_factory_that_does_not_load_names_the_key(factory):
    with pytest.raises(ConfigError, match="task.factory: cannot load") as info:
        build_task(TaskConfig(name="python", factory=factory), seed=0)
    assert info.value.key == "task.factory"


def test_python_task_needs_a_factory():
    with pytest.raises(ConfigError, match="task.factory: is required") as info:
        TrainerConfig.load(None, ["task.name=python"])
    assert info.value.key == "task.factory"
