"""A progress bar over training steps, for a person at a terminal.

Shown only when the logs are rendered for the console (`configure_logging` chose
"console") and stderr is a terminal: never in JSON mode, never on stdout (tqdm writes
to stderr). While it is shown, our log lines are written through `tqdm.write`, so they
scroll above the bar instead of breaking it.

    bar = StepBar(total=cfg.run.steps, initial=start_step)
    bar.update(record)   # once per step, with the step's metrics record
    bar.close()          # idempotent; also on errors (the trainer's cleanup)
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from trainer import metrics as M
from trainer.log import active_format


def bar_enabled() -> bool:
    """Console logging on a terminal: the only case with a bar."""
    return active_format() == "console" and sys.stderr.isatty()


class StepBar:
    """tqdm over steps with reward, staleness and throughput in its postfix; a no-op
    when `enabled` is false (default: `bar_enabled()`)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None):
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if not (bar_enabled() if enabled is None else enabled):
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True, leave=True
        )
        self._redirect.enter_context(logging_redirect_tqdm())

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        postfix = {
            "reward": record.get(M.REWARD_MEAN),
            "stale": record.get(M.STALENESS_MAX),
            "tok/s": record.get(M.PERF_GEN_TOKENS_PER_S),
        }
        self._bar.set_postfix(
            {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in postfix.items() if v is not None}, refresh=False
        )
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is None:
            return
        bar, self._bar = self._bar, None
        self._redirect.close()  # our log handler back on the root logger
        bar.close()
