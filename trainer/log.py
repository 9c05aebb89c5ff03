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
  so "vllm.*" records would propagate to our root handler. But the EngineCore process
  and its worker are spawned: they do not inherit our handler, and their records would
  fall to Python's last-resort handler (WARNING and above, plain text on stderr).
  So instead `configure_logging` writes a `dictConfig` JSON file and points vLLM at it
  (`VLLM_CONFIGURE_LOGGING=1`, `VLLM_LOGGING_CONFIG_PATH`; with configuring off vLLM
  refuses a config file). vLLM copies both into the `LoggingConfig` it hands to every
  process it spawns, and applies the file in each (`dictConfig`, replacing its own). The file gives the "vllm" logger one
  handler, made by `engine_log_handler`: in a process where `configure_logging` ran (the
  trainer) it forwards to the root logger, i.e. to our chain, as if propagating; in an
  engine process it renders the same JSON (or console) lines to that process's stdout,
  plus `process` (vLLM's process name, e.g. "EngineCore") and `pid`. The variables are
  set unless the user set them (or they point at a file of ours from an earlier call or
  a parent process), before the first engine is built. `adopt_logger("vllm")` is the
  fallback when vLLM has configured its logger some other way.
  Left as they were in engine processes: other libraries' records (Python's last-resort
  handler: WARNING and above, text on stderr), and what C++ code or tqdm writes (stderr).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import stat
import sys
import tempfile
import threading
from typing import Any, TextIO

import structlog

_HANDLER_NAME = "rl-trainer"  # marks our root handler, so a second configure replaces it
_VLLM_CONFIG_PREFIX = "rl-trainer-vllm-logging-"  # our dictConfig files for vLLM's processes


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
    colors = stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.name = _HANDLER_NAME
    handler.rlt_format = fmt  # for active_format()
    handler.setFormatter(_formatter(fmt, colors))
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
    _route_vllm_logging(fmt, colors, level)  # see the module docstring
    _adopt_transformers()


def _formatter(fmt: str, colors: bool, extra: list[Any] = ()) -> logging.Formatter:
    """The formatter of every record: structlog's processors, then the renderer.
    `extra` processors run on foreign (stdlib) records after the shared ones."""
    if fmt == "json":
        # Locals stay out: they can be huge (tensors) or secret.
        exceptions = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        tracebacks = structlog.processors.ExceptionRenderer(exceptions)
        final = [tracebacks, structlog.processors.JSONRenderer()]
    elif fmt == "console":
        final = [structlog.dev.ConsoleRenderer(colors=colors)]
    else:
        raise ValueError(f"log format must be 'auto', 'json' or 'console', got {fmt!r}")
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED_PROCESSORS, *extra],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )


def _add_process(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Which process logged: vLLM's name for it ("EngineCore", ...) and its pid."""
    record = event_dict.get("_record")
    name = getattr(record, "vllm_process_name", None) or multiprocessing.current_process().name
    event_dict["process"] = name
    event_dict["pid"] = getattr(record, "process", None) or os.getpid()
    return event_dict


class _ToRoot(logging.Handler):
    """Hands a record to the root logger's handlers: propagation, for a logger that
    vLLM's dictConfig sets to propagate=False."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def engine_log_handler(fmt: str = "json", colors: bool = False) -> logging.Handler:
    """The "vllm" logger's handler, made by the dictConfig file vLLM applies in every
    process it runs in (see the module docstring): forward to our chain where it is
    installed (the trainer's process), else render to this process's stdout."""
    if any(h.name == _HANDLER_NAME for h in logging.getLogger().handlers):
        return _ToRoot()
    on_terminal = fmt == "console" and sys.stdout.isatty()
    handler = _RowClearingHandler(sys.stdout) if on_terminal else logging.StreamHandler(sys.stdout)
    handler.setFormatter(_formatter(fmt, colors, extra=[_add_process]))
    return handler


class _RowClearingHandler(logging.StreamHandler):
    """Clears the terminal row before each line: the trainer process's progress bar
    (trainer/progress.py, on the same terminal) is wiped rather than run into, and
    redrawn at its next update."""

    def format(self, record: logging.LogRecord) -> str:
        return "\r\x1b[K" + super().format(record)


def _route_vllm_logging(fmt: str, colors: bool, level: str) -> None:
    """Point vLLM (this process and the processes it spawns) at a dictConfig file whose
    "vllm" handler is `engine_log_handler`, unless the user configured vLLM's logging."""
    path = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    ours = path is not None and os.path.basename(path).startswith(_VLLM_CONFIG_PREFIX)
    if not ours and (path is not None or "VLLM_CONFIGURE_LOGGING" in os.environ):
        return  # the user's choice
    config = {
        "version": 1,
        "disable_existing_loggers": False,  # else every logger made so far goes silent
        "handlers": {
            # The name stays off our root handler's, which configure_logging replaces.
            "rl-trainer-vllm": {"()": f"{__name__}.engine_log_handler", "fmt": fmt, "colors": colors},
        },
        "loggers": {"vllm": {"handlers": ["rl-trainer-vllm"], "level": level, "propagate": False}},
    }
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = _write_config(config)
    # An engine built earlier in this process (a notebook, a test) left vLLM's own handler
    # on the "vllm" logger: through our chain from now on, not from the next engine build.
    adopt_logger("vllm")


def _write_config(config: dict[str, Any]) -> str:
    """The config as a file named by its content, in a directory only this user can
    write (the file names a callable that dictConfig imports and calls). Never removed:
    engine processes read it at start, a killed trainer could not clean up anyway, and
    there are only a few distinct configs (format x colors x level)."""
    text = json.dumps(config, sort_keys=True)
    name = f"{_VLLM_CONFIG_PREFIX}{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    directory = os.path.join(tempfile.gettempdir(), f"rl-trainer-{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        directory = tempfile.mkdtemp(prefix="rl-trainer-")  # someone else's: a private one
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a process starting now reads the old file or this one
    return path


def _adopt_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def active_format() -> str | None:
    """"json" or "console": the format of the handler `configure_logging` installed;
    None if it is not installed (a library user who set up logging their own way)."""
    for h in logging.getLogger().handlers:
        if h.name == _HANDLER_NAME:
            return getattr(h, "rlt_format", None)
    return None


def adopt_logger(name: str) -> None:
    """Make a library logger that installed its own handler log through ours instead:
    drop its handlers and let its records propagate to the root. Its level is kept."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


# ---- stderr as JSON (the launcher, in JSON mode) ---------------------------------------

# For the training process in JSON mode: progress bars off (tqdm's, Hugging Face's).
QUIET_PROGRESS_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def stderr_record(text: str, pid: int | None = None, level: str = "warning") -> str:
    """One line of someone's stderr (native code, a warning, a stray print) as a JSON
    record shaped like ours (`logger: "stderr"`)."""
    import datetime
    import json

    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    record = {"event": text, "level": level, "logger": "stderr", "thread": None, "timestamp": now}
    if pid is not None:
        record["pid"] = pid
    return json.dumps(record)


def relay_stderr(pipe: Any, out: TextIO, pid: int) -> threading.Thread:
    """A daemon thread copying `pipe` (a child process group's stderr) to `out`, every
    line a JSON object: JSON lines as they are, anything else wrapped by stderr_record
    (carriage returns split lines: a progress bar's updates). It reads to the end
    whatever a line holds, so that no writer in the group ever blocks on a full pipe."""

    def run() -> None:
        import json

        pending = b""
        while True:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk.replace(b"\r", b"\n")
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = raw.decode(errors="replace").rstrip()
                if not text.strip():
                    continue
                try:
                    is_json = isinstance(json.loads(text), dict)
                except ValueError:
                    is_json = False
                try:
                    out.write((text if is_json else stderr_record(text, pid)) + "\n")
                    out.flush()
                except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
                    pass
        if pending.strip():
            try:
                out.write(stderr_record(pending.decode(errors="replace").rstrip(), pid) + "\n")
                out.flush()
            except (OSError, ValueError):
                pass

    thread = threading.Thread(target=run, name="stderr-relay", daemon=True)
    thread.start()
    return thread
