"""Tasks: a prompt source plus a reward.

Prompts are addressed by a global index (the trainer's prompt cursor), so a resumed run
continues exactly where it stopped and every engine can draw from the same sequence.
Rewards are Python functions of the completion text; they run in the reward pool
(workers/rewards.py), off the engines' threads, each call timed.

Built in:
* `ArithmeticTask`: "What is 17 + 25? Answer with just the number.", generated from
  (seed, index), no download. Reward: the last number in the completion.
* `JsonlTask`: prompts and answers from a JSONL file. Reward: the completion ends with
  the answer (normalized).
* `MathTask`: math problems (GSM8K, MATH) from a JSONL or parquet file, loaded with the
  `datasets` library. Reward: math-verify says the completion's final answer equals the
  reference one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import os
import pathlib
import random
import re
import tempfile
from typing import Any, Protocol

from trainer.config import TaskConfig
from trainer.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Prompt:
    index: int
    """global prompt index: the cursor position it was drawn at"""
    text: str
    """the user message"""
    answer: str
    """the reference answer the reward compares against"""


class Task(Protocol):
    def prompt(self, index: int) -> Prompt: ...

    def reward(self, completion_text: str, prompt: Prompt) -> float: ...


# An integer or a decimal, with its sign; "1,000" reads as two numbers (never needed here).
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ArithmeticTask:
    """Sums and differences of two operands in 0..max_operand; differences are never
    negative (the larger operand comes first), so answers are natural numbers.

    Reward: 1.0 if the last number in the completion equals the answer, else 0.0.
    The last number, not the first, so "17 + 25 = 42" scores; a completion that keeps
    talking after the answer, or is cut off by max_tokens, usually ends on some other
    number and scores 0, which pushes towards the asked-for bare number. "42.0" equals 42."""

    def __init__(self, seed: int = 0, max_operand: int = 50):
        self.seed = seed
        self.max_operand = max_operand

    def prompt(self, index: int) -> Prompt:
        # A string seed is hashed with SHA-512: the same prompt for (seed, index) in
        # every process and Python version, whatever PYTHONHASHSEED is.
        rng = random.Random(f"{self.seed}-{index}")
        a = rng.randint(0, self.max_operand)
        b = rng.randint(0, self.max_operand)
        if rng.random() < 0.5:
            text, answer = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            text, answer = f"What is {a} - {b}?", a - b
        return Prompt(index=index, text=f"{text} Answer with just the number.", answer=str(answer))

    def reward(self, completion_text: str, prompt: Prompt) -> float:
        numbers = _NUMBER.findall(completion_text)
        if not numbers:
            return 0.0
        return 1.0 if float(numbers[-1]) == float(prompt.answer) else 0.0


def _normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes and final punctuation removed."""
    text = " ".join(text.split()).casefold()
    return text.strip(" \"'`").rstrip(".!?;:,").strip(" \"'`")


def _read_jsonl(path: str, fields: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """(1-based line number, the string under each of `fields`) for every non-blank line
    of a JSONL file. `fields` pairs each field with the config key that names it, so an
    error points at the setting to change. Any bad line raises DataError naming the file and
    line; so does a file with no rows."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the JSONL file: {e.strerror}", path, key="task.path") from e
    rows = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path, line_no, key="task.path") from e
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, line_no, key="task.path") from e
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path, line_no, key="task.path")
        for field, key in fields:
            if field not in row:
                raise DataError(f"missing field '{field}' (fields: {', '.join(row) or 'none'})", path, line_no, key=key)
            if not isinstance(row[field], str):
                raise DataError(
                    f"field '{field}' must be a string, got {type(row[field]).__name__} {row[field]!r}",
                    path, line_no, key=key,
                )
        rows.append((line_no, [row[field] for field, _ in fields]))
    if not rows:
        raise DataError("the JSONL file has no rows", path, key="task.path")
    return rows


class JsonlTask:
    """Prompts and answers from a JSONL file: one JSON object per line, with a string
    under `prompt_field` and one under `answer_field`. Blank lines are skipped. The
    whole file is read and checked up front; any bad row raises DataError naming the
    file and its 1-based line. Index i is row i % len(rows): the data set repeats.

    Reward: 1.0 if the normalized completion ends with the normalized answer on a word
    boundary ("The capital is Paris." scores for "paris"; "142" does not for "42"), else
    0.0. Normalized: case-folded, whitespace collapsed, surrounding quotes and final
    punctuation (.!?;:,) removed."""

    def __init__(self, path: str | pathlib.Path, prompt_field: str = "prompt", answer_field: str = "answer"):
        self.path = str(path)
        rows = _read_jsonl(self.path, [(prompt_field, "task.prompt_field"), (answer_field, "task.answer_field")])
        self.rows: list[tuple[str, str]] = [(text, answer) for _, (text, answer) in rows]  # (prompt, answer)
        self.lines: list[int] = [line_no for line_no, _ in rows]  # the file line of each row, for where()

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        """"FILE:LINE" of the row prompt(index) comes from, for messages about that prompt."""
        return f"{self.path}:{self.lines[index % len(self.lines)]}"

    def prompt(self, index: int) -> Prompt:
        text, answer = self.rows[index % len(self.rows)]
        return Prompt(index=index, text=text, answer=answer)

    def reward(self, completion_text: str, prompt: Prompt) -> float:
        completion, answer = _normalize(completion_text), _normalize(prompt.answer)
        if not answer or not completion.endswith(answer):
            return 0.0
        before = completion[: len(completion) - len(answer)]
        return 1.0 if before == "" or not before[-1].isalnum() else 0.0


# GSM8K writes large numbers with thousands commas ("#### 1,234"); math-verify would read
# "1,234" as a pair. Only a comma followed by exactly three digits is a thousands comma.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BOXED = re.compile(r"\\boxed\s*\{")


def extract_gold_answer(text: str) -> str:
    """The reference answer inside a solution: the text after the last "####" (GSM8K),
    thousands commas removed; else the content of the last \\boxed{...} (MATH), nested
    braces included; else the whole text. Stripped; "" if there is nothing. Raises
    ValueError for a \\boxed{ that is never closed (its answer cannot be known)."""
    if "####" in text:
        return _THOUSANDS_COMMA.sub("", text.rpartition("####")[2]).strip()
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return text.strip()
    depth = 1
    for i in range(starts[-1], len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1] : i].strip()
    raise ValueError("\\boxed{ without its closing brace")


def _load_with_datasets(builder: str, path: str) -> dict[str, list]:
    """The columns of a local file as plain lists, read by the `datasets` builder ("json"
    or "parquet"). Offline: a local file needs no network, and HF_DATASETS_OFFLINE stops
    any attempt. Through a fresh cache directory, removed afterwards: datasets keys its
    cache of a local file on the path and modification time only, so a file rewritten
    under the same name with the same mtime (coarse timestamps, a restored copy) would
    otherwise be served stale; nothing is left in ~/.cache either. The file is read
    through a symlink with a plain name because datasets takes data_files as glob
    patterns: "a[1].jsonl" would load "a1.jsonl"."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # lazily: importing trainer.tasks stays cheap

    with tempfile.TemporaryDirectory(prefix="rlt-datasets-", ignore_cleanup_errors=True) as tmp:
        link = os.path.join(tmp, f"data.{builder}")
        os.symlink(os.path.abspath(path), link)
        try:
            ds = datasets.load_dataset(builder, data_files=link, split="train", cache_dir=os.path.join(tmp, "cache"))
            return ds.to_dict()
        except Exception as e:
            cause = e  # datasets wraps the reader's error in a vaguer one ("An error occurred...")
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise DataError(f"cannot load with datasets: {type(cause).__name__}: {cause}", path, key="task.path") from e


def _math_verify() -> tuple[Any, Any]:
    """math-verify's (parse, verify), imported on first use (it pulls in sympy and antlr).
    The callers turn its signal.alarm timeouts off (they raise ValueError outside the main
    thread, and rewards run in worker threads); the trainer times reward calls itself.
    math-verify warns once per module that timeouts are off: that warning is the expected
    state here, so it is marked as already shown rather than logged in every run."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify.parse, math_verify.verify


class MathTask:
    """Math problems with checkable final answers (GSM8K, MATH) from a JSONL (.jsonl,
    .json: one object per line) or parquet (.parquet) file, loaded with `datasets`. The
    question is under `prompt_field`; the reference solution under `answer_field`, whose
    final answer is taken by `extract_gold_answer` ("#### 42", or the last \\boxed{}).
    The whole file is read and checked up front; a bad row raises DataError naming the
    file and its line (JSONL, 1-based) or row (parquet, 0-based). Index i is row
    i % len(rows).

    The prompt is the question plus INSTRUCTION, so the model ends on a \\boxed{} answer
    that the grader can find. Reward: 1.0 if math-verify finds the completion's final
    answer mathematically equal to the reference ("\\boxed{0.5}" for "\\frac{1}{2}"),
    else 0.0; a completion it cannot parse scores 0.0. Only plain lists are kept, so the
    task pickles into a reward process."""

    INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

    def __init__(self, path: str | pathlib.Path, prompt_field: str = "prompt", answer_field: str = "answer"):
        self.path = str(path)
        fields = [(prompt_field, "task.prompt_field"), (answer_field, "task.answer_field")]
        suffix = pathlib.Path(self.path).suffix.lower()
        if suffix in (".jsonl", ".json"):
            # Checked line by line first: datasets' own errors name no line, and it would
            # silently turn a "2" into 2 in a column that also holds numbers.
            checked = _read_jsonl(self.path, fields)
            self.lines: list[int] | None = [line_no for line_no, _ in checked]
            columns = _load_with_datasets("json", self.path)
            if len(columns[prompt_field]) != len(checked):
                raise DataError(
                    f"datasets read {len(columns[prompt_field])} rows, the file has {len(checked)}",
                    self.path, key="task.path",
                )
        elif suffix == ".parquet":
            try:
                open(self.path, "rb").close()
            except OSError as e:
                raise DataError(f"cannot read the parquet file: {e.strerror}", self.path, key="task.path") from e
            # The footer first (pyarrow comes with datasets): datasets fails on a file of
            # no rows, or not parquet at all, with errors that do not say so.
            import pyarrow.parquet

            try:
                metadata = pyarrow.parquet.read_metadata(self.path)
            except Exception as e:
                raise DataError(f"not a parquet file: {e}", self.path, key="task.path") from e
            if metadata.num_rows == 0:
                raise DataError("the parquet file has no rows", self.path, key="task.path")
            self.lines = None
            columns = _load_with_datasets("parquet", self.path)
            for field, key in fields:
                if field not in columns:
                    raise DataError(
                        f"missing column '{field}' (columns: {', '.join(columns) or 'none'})", self.path, key=key
                    )
        else:
            raise DataError(
                f"expected a .jsonl, .json or .parquet file, got {suffix or 'no extension'!r}",
                self.path, key="task.path",
            )
        self.rows: list[tuple[str, str]] = []  # (prompt, gold answer)
        for i, (text, solution) in enumerate(zip(columns[prompt_field], columns[answer_field])):
            for (field, key), value in zip(fields, (text, solution)):
                if not isinstance(value, str):
                    message = f"field '{field}' must be a string, got {type(value).__name__} {value!r}"
                    raise self._row_error(i, message, key)
            try:
                gold = extract_gold_answer(solution)
            except ValueError as e:
                raise self._row_error(i, f"field '{answer_field}': {e}", "task.answer_field") from e
            if not gold:
                raise self._row_error(i, f"field '{answer_field}' holds no answer: {solution!r}", "task.answer_field")
            self.rows.append((text, gold))

    def _row_error(self, row: int, message: str, key: str) -> DataError:
        if self.lines is not None:
            return DataError(message, self.path, self.lines[row], key=key)
        return DataError(f"row {row}: {message}", self.path, key=key)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        """"FILE:LINE" (JSONL) or "FILE:row N" (parquet, 0-based) of the row prompt(index)
        comes from, for messages about that prompt."""
        row = index % len(self.rows)
        if self.lines is not None:
            return f"{self.path}:{self.lines[row]}"
        return f"{self.path}:row {row}"

    def prompt(self, index: int) -> Prompt:
        text, gold = self.rows[index % len(self.rows)]
        return Prompt(index=index, text=f"{text}\n{self.INSTRUCTION}", answer=gold)

    def reward(self, completion_text: str, prompt: Prompt) -> float:
        # Timeouts off (None): math-verify's are signal.alarm, main thread only; the
        # trainer bounds each reward call. The reference is re-boxed so that it parses as
        # LaTeX, the way it was written; the completion is searched for its last answer.
        try:
            parse, verify = _math_verify()
            gold = parse("\\boxed{" + prompt.answer + "}", parsing_timeout=None)
            answer = parse(completion_text, parsing_timeout=None)
            return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0
        except Exception:  # anything math-verify cannot handle is not a correct answer
            return 0.0


def build_task(task_cfg: TaskConfig, seed: int) -> Task:
    """The task a `TaskConfig` names."""
    if task_cfg.name == "arithmetic":
        return ArithmeticTask(seed=seed, max_operand=task_cfg.max_operand)
    if task_cfg.name == "jsonl":
        return JsonlTask(task_cfg.path, task_cfg.prompt_field, task_cfg.answer_field)
    if task_cfg.name == "math":
        return MathTask(task_cfg.path, task_cfg.prompt_field, task_cfg.answer_field)
    if task_cfg.name == "python":
        module, _, name = task_cfg.factory.partition(":")
        try:
            factory = operator.attrgetter(name)(importlib.import_module(module))
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"task.factory: cannot load {task_cfg.factory!r}: {e}", key="task.factory") from e
        return factory()
    raise ConfigError(f"task.name: unknown task {task_cfg.name!r}", key="task.name")


def render_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of the prompt as the model expects it: the user message in the chat
    template with the assistant turn opened, or the plain text if the tokenizer has no
    template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=False
        )
        # The template already holds any special tokens (BOS): don't add them twice.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt.text)["input_ids"])
