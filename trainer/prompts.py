"""Prompt bookkeeping: which prompt comes next, which were trained, which cannot fit.

Prompts are addressed by a global index. `PromptCursor` hands them out in index order
to every worker thread; `TrainedPrompts` records, for checkpoints, which indices are
done (trained, or skipped for good because they cannot fit the engine). A resumed run
hands out prompts from the record's low-water mark, skipping those done above it: no
prompt is trained twice and none is skipped.

A prompt cannot fit when its tokens + gen.max_tokens exceed engine.max_model_len.
File tasks (those with a length) are scanned when loaded (`scan_overlong`):
task.overlong=error stops the run there, naming file:line. Otherwise, and for
generated prompts, the cursor skips such a prompt when it draws it, with a
`prompt_skipped` event; the count is the `data/prompts_skipped` metric.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import structlog

from trainer.errors import DataError
from trainer.tasks import render_prompt
from workers.worker import PromptItem

log = structlog.get_logger(__name__)


def where(task: Any, index: int) -> str | None:
    """The file:line a task's prompt comes from, if the task can say."""
    locate = getattr(task, "where", None)
    return locate(index) if callable(locate) else None


def _overlong_error(task: Any, index: int, tokens: int, max_prompt_tokens: int) -> DataError:
    location = where(task, index)
    message = (
        f"prompt {index} has {tokens} tokens, more than the {max_prompt_tokens} that fit "
        "(engine.max_model_len - gen.max_tokens); raise engine.max_model_len, or set task.overlong=skip"
    )
    if location is not None:
        path, _, line = location.rpartition(":")
        if line.isdigit():
            return DataError(message, path, int(line), key="task.path")
        return DataError(f"{line}: {message}", path, key="task.path")  # "row N" of a parquet file
    return DataError(message, f"task {type(task).__name__}", key="task.path")


def scan_overlong(task: Any, tokenizer: Any, max_prompt_tokens: int, overlong: str) -> dict[int, int]:
    """For a task with a length (a file): row index -> tokens of every row that cannot
    fit. overlong=error raises DataError naming the first such row's file:line."""
    if not hasattr(task, "__len__"):
        return {}
    found = {}
    for index in range(len(task)):
        tokens = len(render_prompt(tokenizer, task.prompt(index)))
        if tokens > max_prompt_tokens:
            if overlong == "error":
                raise _overlong_error(task, index, tokens, max_prompt_tokens)
            found[index] = tokens
    if found:
        log.warning(
            "overlong_prompts", rows=len(found), of_rows=len(task), max_prompt_tokens=max_prompt_tokens,
            first=[where(task, i) or i for i in sorted(found)[:5]],
        )
    return found


class PromptCursor:
    """Hands out prompts in index order to every worker thread: the shared prompt source.
    A resumed run starts at the done prompts' low-water mark and skips the indices in
    `skip` (those above it already done; see TrainedPrompts). A prompt longer than
    `max_prompt_tokens` is skipped (task.overlong=skip) or raises DataError ("error")."""

    def __init__(
        self,
        task: Any,
        tokenizer: Any,
        start: int = 0,
        skip: Iterable[int] = (),
        max_prompt_tokens: int | None = None,
        overlong: str = "skip",
    ):
        self._task = task
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.cursor = start
        self._skip = {i for i in skip if i >= start}
        self._max_prompt_tokens = max_prompt_tokens
        self._overlong = overlong
        self._skipped: list[int] = []  # overlong indices not yet taken by take_skipped()
        self.skipped_total = 0  # overlong prompts skipped by this cursor

    def next(self) -> PromptItem:
        with self._lock:
            while True:
                while self.cursor in self._skip:
                    self._skip.discard(self.cursor)
                    self.cursor += 1
                index = self.cursor
                self.cursor += 1
                prompt = self._task.prompt(index)
                token_ids = render_prompt(self._tokenizer, prompt)
                limit = self._max_prompt_tokens
                if limit is None or len(token_ids) <= limit:
                    return PromptItem(index=index, token_ids=token_ids, data=prompt)
                if self._overlong == "error":
                    raise _overlong_error(self._task, index, len(token_ids), limit)
                self._skipped.append(index)
                self.skipped_total += 1
                log.warning(
                    "prompt_skipped", prompt_index=index, reason="overlong", tokens=len(token_ids),
                    max_prompt_tokens=limit, where=where(self._task, index),
                )

    def take_skipped(self) -> list[int]:
        """The overlong prompt indices skipped since the last call: done for good."""
        with self._lock:
            taken, self._skipped = self._skipped, []
        return taken


class TrainedPrompts:
    """The prompt indices done so far (trained, or skipped as overlong): every index
    below `low_water`, and the sparse set `above` it. Prompts are handed out in index
    order but trained in completion order (several engines, staleness), so a prefix is
    not enough. Saved in checkpoints: a resumed run hands out prompts from `low_water`,
    skipping `above`, so no prompt is trained twice and none is skipped (groups in flight
    at the stop are generated again). A group given up by its worker
    (reward.on_error=skip) stays below the mark until a resumed run tries it again."""

    def __init__(self, low_water: int = 0, above: Iterable[int] = ()):
        self.low_water = low_water
        self.above = set(above)
        self._advance()

    def add(self, indices: Iterable[int]) -> None:
        for i in indices:
            if i < self.low_water or i in self.above:
                raise RuntimeError(f"prompt {i} trained on twice (low water mark {self.low_water})")
            self.above.add(i)
        self._advance()

    def __contains__(self, index: int) -> bool:
        return index < self.low_water or index in self.above

    def _advance(self) -> None:
        while self.low_water in self.above:
            self.above.remove(self.low_water)
            self.low_water += 1

    def state(self) -> dict[str, Any]:
        return {"low_water": self.low_water, "above": sorted(self.above)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrainedPrompts:
        return cls(int(state["low_water"]), (int(i) for i in state["above"]))
