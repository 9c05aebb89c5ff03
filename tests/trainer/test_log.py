"""Logging: one chain for structlog and stdlib records, JSON lines, idempotent set-up."""

import contextvars
import datetime
import io
import json
import logging
import logging.config
import pathlib
import re
import threading
import warnings

import pytest
import structlog

from trainer.log import adopt_logger, configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """Each test configures logging from scratch; undo it afterwards."""
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    root = logging.getLogger()
    vllm_logger = logging.getLogger("vllm")
    vllm_state = (list(vllm_logger.handlers), vllm_logger.level, vllm_logger.propagate)
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate = vllm_state
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream):
    """Every output line, parsed: a line that is not one JSON object fails the test."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def json_stream(level="INFO"):
    stream = io.StringIO()
    configure_logging("json", level, stream=stream)
    return stream


def test_json_record_fields():
    stream = json_stream()
    structlog.contextvars.bind_contextvars(run_id="r1", step=3)
    get_logger("trainer.test").info("train_step", loss=0.5)
    (record,) = lines(stream)
    assert record["event"] == "train_step"
    assert record["loss"] == 0.5
    assert record["level"] == "info"
    assert record["logger"] == "trainer.test"
    assert record["thread"] == "MainThread"
    assert (record["run_id"], record["step"]) == ("r1", 3)
    ts = datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds()) < 60


def test_thread_name_and_context_of_a_worker_thread():
    stream = json_stream()
    log = get_logger("workers.worker")

    def work():
        structlog.contextvars.bind_contextvars(worker="gen-3", engine=3)
        log.info("worker_started")

    structlog.contextvars.bind_contextvars(run_id="r2")
    ctx = contextvars.copy_context()  # as the supervisor starts its workers
    t = threading.Thread(target=ctx.run, args=(work,), name="gen-3")
    t.start()
    t.join()
    log.info("main_again")
    worker_line, main_line = lines(stream)
    assert worker_line["thread"] == "gen-3"
    assert (worker_line["run_id"], worker_line["worker"], worker_line["engine"]) == ("r2", "gen-3", 3)
    assert main_line["thread"] == "MainThread"
    assert "worker" not in main_line  # bound in the thread's context copy only


def test_exception_is_structured_not_text():
    stream = json_stream()

    def fail():
        raise ZeroDivisionError("division by zero")

    try:
        fail()
    except ZeroDivisionError:
        get_logger("t").error("run_failed", exc_info=True)
    (record,) = lines(stream)
    assert "exc_info" not in record
    (exc,) = record["exception"]
    assert exc["exc_type"] == "ZeroDivisionError"
    assert exc["exc_value"] == "division by zero"
    assert [f["name"] for f in exc["frames"]] == ["test_exception_is_structured_not_text", "fail"]
    assert all("locals" not in f for f in exc["frames"])  # locals can be huge or secret


def test_stdlib_record_goes_through_the_same_chain():
    stream = json_stream()
    structlog.contextvars.bind_contextvars(run_id="r3")
    logging.getLogger("vllm.v1.engine").warning("engine %d is %s", 0, "slow")
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("some.lib").exception("lookup failed")
    warn_line, exc_line = lines(stream)
    assert warn_line["event"] == "engine 0 is slow"
    assert warn_line["level"] == "warning"
    assert warn_line["logger"] == "vllm.v1.engine"
    assert warn_line["thread"] == "MainThread"
    assert warn_line["run_id"] == "r3"
    assert "timestamp" in warn_line
    assert exc_line["level"] == "error"
    assert exc_line["exception"][0]["exc_type"] == "KeyError"


def test_warnings_are_logged():
    stream = json_stream()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning)
    (record,) = lines(stream)
    assert record["logger"] == "py.warnings"
    assert "UserWarning: careful" in record["event"]


def test_level_filters_both_kinds_of_records():
    stream = json_stream(level="WARNING")
    get_logger("a").info("dropped")
    logging.getLogger("b").info("dropped too")
    get_logger("a").warning("kept")
    assert [r["event"] for r in lines(stream)] == ["kept"]


def test_configure_twice_does_not_duplicate_lines():
    first = io.StringIO()
    configure_logging("json", stream=first)
    second = io.StringIO()
    configure_logging("json", stream=second)
    get_logger("a").info("once")
    logging.getLogger("b").info("once too")
    assert first.getvalue() == ""  # the first handler was replaced, not kept
    assert [r["event"] for r in lines(second)] == ["once", "once too"]
    ours = [h for h in logging.getLogger().handlers if h.name == "rl-trainer"]
    assert len(ours) == 1


def test_logger_created_before_configure_follows_it():
    early = structlog.get_logger("trainer.early")  # module-level loggers are made at import
    stream = json_stream()
    early.info("late_event")
    assert lines(stream)[0]["logger"] == "trainer.early"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_auto_is_json_off_a_terminal_and_console_on_one():
    stream = io.StringIO()
    configure_logging("auto", stream=stream)
    get_logger("a").info("hello", x=1)
    assert lines(stream)[0]["event"] == "hello"

    tty = FakeTTY()
    configure_logging("auto", stream=tty)
    get_logger("a").info("hello", x=1)
    out = re.sub(r"\x1b\[[0-9;]*m", "", tty.getvalue())  # colors on a terminal
    assert "[info     ] hello" in out and "x=1" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="'xml'"):
        configure_logging("xml", stream=io.StringIO())


def test_adopt_logger_reroutes_a_library_with_its_own_handler():
    stream = json_stream()
    lib = logging.getLogger("lib_with_handler")
    own = io.StringIO()
    lib.addHandler(logging.StreamHandler(own))
    lib.propagate = False  # as vLLM configures its "vllm" logger
    lib.setLevel(logging.INFO)
    lib.info("before")
    assert lines(stream) == []

    adopt_logger("lib_with_handler")
    lib.info("after")
    assert [r["event"] for r in lines(stream)] == ["after"]
    assert own.getvalue() == "before\n"  # its own handler saw nothing more
    assert lib.level == logging.INFO  # the level is kept


def test_transformers_records_are_adopted():
    from transformers.utils import logging as hf_logging

    stream = json_stream()
    hf_logging.get_logger("transformers.modeling_utils").warning("weights not initialized")
    (record,) = lines(stream)
    assert record["logger"] == "transformers.modeling_utils"
    assert record["event"] == "weights not initialized"


def apply_vllm_config():
    """What vLLM does with VLLM_LOGGING_CONFIG_PATH in each of its processes."""
    import os

    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as f:
        logging.config.dictConfig(json.load(f))


def test_vllm_is_pointed_at_our_logging_config(monkeypatch):
    import os

    json_stream()
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "1"  # vLLM ignores a config file otherwise
    first = os.environ["VLLM_LOGGING_CONFIG_PATH"]
    config = json.loads(open(first).read())
    assert config["disable_existing_loggers"] is False
    assert config["loggers"]["vllm"]["level"] == "INFO"
    json_stream(level="DEBUG")  # a second call replaces our file, with the new level
    second = os.environ["VLLM_LOGGING_CONFIG_PATH"]
    assert second != first
    assert json.loads(open(second).read())["loggers"]["vllm"]["level"] == "DEBUG"


@pytest.mark.parametrize(
    "env",
    [{"VLLM_CONFIGURE_LOGGING": "0"}, {"VLLM_CONFIGURE_LOGGING": "1"}, {"VLLM_LOGGING_CONFIG_PATH": "/etc/mine.json"}],
)
def test_a_users_vllm_logging_choice_wins(monkeypatch, env):
    import os

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    json_stream()
    for k in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH"):
        assert os.environ.get(k) == env.get(k)


def test_vllm_records_in_the_trainer_process_stay_in_our_chain():
    stream = json_stream()
    apply_vllm_config()  # as LLMEngine.__init__ does in the trainer's process
    structlog.contextvars.bind_contextvars(run_id="r9")
    logging.getLogger("vllm.v1.engine.core_client").info("engine %s ready", "e0")
    get_logger("trainer.x").info("after")
    vllm_line, after = lines(stream)  # once each: no second handler
    assert vllm_line["event"] == "engine e0 ready"
    assert vllm_line["logger"] == "vllm.v1.engine.core_client"
    assert vllm_line["run_id"] == "r9"
    assert "process" not in vllm_line
    assert after["event"] == "after"
    # A reconfiguration (new stream) is followed by the records vLLM's logger forwards.
    second = json_stream()
    logging.getLogger("vllm.x").warning("later")
    assert [r["event"] for r in lines(second)] == ["later"]


def test_engine_process_logs_json_lines_to_its_stdout(tmp_path):
    """A fresh interpreter stands in for a spawned EngineCore: it applies the file
    vLLM would, and its vLLM records come out as our JSON lines on its stdout."""
    import os
    import subprocess
    import sys

    json_stream()
    code = (
        "import json, logging, logging.config, os\n"
        "logging.config.dictConfig(json.load(open(os.environ['VLLM_LOGGING_CONFIG_PATH'])))\n"
        "log = logging.getLogger('vllm.v1.engine.core')\n"
        "log.info('engine core %s', 'started')\n"
        "log.debug('dropped: below the level')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('EngineCore failed')\n"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=os.environ.copy(), timeout=60)
    assert done.returncode == 0, done.stderr
    started, failed = [json.loads(line) for line in done.stdout.splitlines()]
    for record in (started, failed):
        assert {"timestamp", "level", "event", "logger", "thread", "process", "pid"} <= set(record)
        assert record["pid"] != os.getpid()
        assert record["timestamp"].endswith("Z")
    assert started["event"] == "engine core started"
    assert started["level"] == "info"
    assert failed["exception"][0]["exc_type"] == "ZeroDivisionError"
    assert done.stderr == ""


def test_a_vllm_logger_set_up_before_is_taken_over():
    """An engine built earlier in the process (vLLM's default config: its own stdout
    handler, propagate=False) must not keep vLLM's records out of our chain."""
    vllm_logger = logging.getLogger("vllm")
    foreign = logging.StreamHandler(io.StringIO())
    vllm_logger.addHandler(foreign)
    vllm_logger.propagate = False
    try:
        stream = json_stream()
        logging.getLogger("vllm.v1.engine").warning("after an earlier engine")
        (record,) = lines(stream)
        assert record["event"] == "after an earlier engine"
        assert foreign not in vllm_logger.handlers and foreign.stream.getvalue() == ""
    finally:
        vllm_logger.removeHandler(foreign)
        vllm_logger.propagate = True
