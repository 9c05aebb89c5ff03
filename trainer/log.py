"""Logging set-up: one structlog processor chain for our events and for every
standard-library record (vLLM, transformers, warnings).

    configure_logging("json")             # once per process; calling it again replaces it
    log = get_logger(__name__)
    structlog.contextvars.bind_contextvars(run_id="abc", step=3)
    log.info("train_step", loss=0.12)
    -> {"loss": 0.12, "event": "train_step", "run_id": "abc", "step": 3, "level": "info",
        "logger": "trainer.x", "thread": "MainThread", "timestamp": "2025-01-01T12:00:00.000000Z"}

How it fits together: structlog loggers are stdlib loggers underneath
(`structlog.stdlib.LoggerFactory`), so every record, ours or a library's, reaches the
one handler on the root logger. Its `ProcessorFormatter` runs the shared processors
(context variables, level, logger name, thread, timestamp) on foreign records, then the
renderer: JSON lines, with exceptions as structured fields, or the console renderer.
Handlers run in the logging thread, so the context variables and the thread name are
those of the code that logged.

Libraries with their own handler:
* transformers puts a stderr handler on its "transformers" logger and turns propagation
  off; `configure_logging` undoes that with its public API.
* vLLM (0.32, vllm/logger.py) configures logging when an engine is built, not at import:
  `LLMEngine.__init__` and `EngineArgs.create_engine_config` call
  `configure_logging_if_needed`, which runs `logging.config.dictConfig` giving the
  "vllm" logger its own stdout handler and `propagate=False`; each spawned EngineCore
  process does the same at start. With `VLLM_CONFIGURE_LOGGING=0` it skips all of that,
  so "vllm.*" records propagate to our root handler. `configure_logging` therefore sets
  that variable (unless the user set it), which must happen before the first engine is
  built; this also keeps vLLM's text lines out of a JSON stdout. `adopt_logger("vllm")`
  is the fallback when vLLM has configured its logger anyway.
  The EngineCore processes are spawned: they do not inherit our handler, so with the
  variable set their records fall to Python's last-resort handler (WARNING and above,
  plain text on stderr; a fatal engine error still prints with its traceback), and
  their INFO lines are dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog

_HANDLER_NAME = "rl-trainer"  # marks our root handler, so a second configure replaces it


def _add_thread(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["thread"] = threading.current_thread().name
    return event_dict


# Run on every record: structlog events before they are handed to the stdlib logger,
# foreign records inside the formatter.
_SHARED_PROCESSORS = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _add_thread,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route all logging through one handler on the root logger.

    fmt: "json" (one JSON object per line), "console", or "auto" (console if `stream`
    is a terminal, else JSON). level: the root logger's level. stream: default stdout.
    Idempotent: a second call replaces the handler this function installed earlier;
    handlers installed by others are left alone."""
    stream = sys.stdout if stream is None else stream
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if fmt == "json":
        # Locals stay out: they can be huge (tensors) or secret.
        exceptions = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        tracebacks = structlog.processors.ExceptionRenderer(exceptions)
        final = [tracebacks, structlog.processors.JSONRenderer()]
    elif fmt == "console":
        final = [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    else:
        raise ValueError(f"log format must be 'auto', 'json' or 'console', got {fmt!r}")

    handler = logging.StreamHandler(stream)
    handler.name = _HANDLER_NAME
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED_PROCESSORS,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Loggers created before this call (module-level `log = get_logger(...)`) must
        # pick up a reconfiguration, so they are not cached.
        cache_logger_on_first_use=False,
    )

    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> our chain
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # see the module docstring
    _adopt_transformers()


def _adopt_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def adopt_logger(name: str) -> None:
    """Make a library logger that installed its own handler log through ours instead:
    drop its handlers and let its records propagate to the root. Its level is kept."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
