"""Tasks: a prompt source plus a reward.

Prompts are addressed by a global index (the trainer's prompt cursor), so a resumed run
continues exactly where it stopped and every engine can draw from the same sequence.
Rewards are pure Python functions of the completion text: they run in the worker
threads.

Built in:
* `ArithmeticTask`: "What is 17 + 25? Answer with just the number.", generated from
  (seed, index), no download. Reward: the last number in the completion.
* `JsonlTask`: prompts and answers from a JSONL file. Reward: the completion ends with
  the answer (normalized).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import pathlib
import random
import re
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
        self.rows: list[tuple[str, str]] = []  # (prompt, answer)
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read the JSONL file: {e.strerror}", self.path, key="task.path") from e
        for line_no, raw in enumerate(data.split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not UTF-8 text ({e.reason} at byte {e.start})", self.path, line_no, key="task.path"
                ) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", self.path, line_no, key="task.path") from e
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", self.path, line_no, key="task.path")
            for field, key in ((prompt_field, "task.prompt_field"), (answer_field, "task.answer_field")):
                if field not in row:
                    raise DataError(
                        f"missing field '{field}' (fields: {', '.join(row) or 'none'})", self.path, line_no, key=key
                    )
                if not isinstance(row[field], str):
                    raise DataError(
                        f"field '{field}' must be a string, got {type(row[field]).__name__} {row[field]!r}",
                        self.path, line_no, key=key,
                    )
            self.rows.append((row[prompt_field], row[answer_field]))
        if not self.rows:
            raise DataError("the JSONL file has no rows", self.path, key="task.path")

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, index: int) -> Prompt:
        text, answer = self.rows[index % len(self.rows)]
        return Prompt(index=index, text=text, answer=answer)

    def reward(self, completion_text: str, prompt: Prompt) -> float:
        completion, answer = _normalize(completion_text), _normalize(prompt.answer)
        if not answer or not completion.endswith(answer):
            return 0.0
        before = completion[: len(completion) - len(answer)]
        return 1.0 if before == "" or not before[-1].isalnum() else 0.0


def build_task(task_cfg: TaskConfig, seed: int) -> Task:
    """The task a `TaskConfig` names."""
    if task_cfg.name == "arithmetic":
        return ArithmeticTask(seed=seed, max_operand=task_cfg.max_operand)
    if task_cfg.name == "jsonl":
        return JsonlTask(task_cfg.path, task_cfg.prompt_field, task_cfg.answer_field)
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
