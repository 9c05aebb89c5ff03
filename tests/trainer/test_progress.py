"""The step progress bar: only for console logs on a terminal, on stderr."""

import io
import logging

import pytest
import structlog

from trainer import metrics as M
from trainer.log import active_format, configure_logging, get_logger
from trainer.progress import StepBar, bar_enabled


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def test_no_bar_in_json_mode_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTTY())
    configure_logging("json", stream=io.StringIO())
    assert active_format() == "json"
    assert not bar_enabled()
    bar = StepBar(3)
    assert not bar.enabled
    bar.update({M.REWARD_MEAN: 0.5})
    bar.close()


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    configure_logging("console", stream=FakeTTY())
    assert not bar_enabled()


def test_no_bar_without_our_logging():
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if h.name != "rl-trainer"]
    assert active_format() is None
    assert not bar_enabled()


def test_bar_on_stderr_and_logs_above_it(monkeypatch):
    err, out = FakeTTY(), FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    configure_logging("console")  # the CLI's case: stdout
    assert bar_enabled()
    bar = StepBar(total=4, initial=1)  # a resumed run: one step done
    assert bar.enabled
    get_logger("t").info("train_step", step=1)
    bar.update({M.REWARD_MEAN: 0.25, M.STALENESS_MAX: 1, M.PERF_GEN_TOKENS_PER_S: 123.4})
    bar.close()
    bar.close()  # idempotent
    assert "2/4" in err.getvalue()
    assert "reward=0.25" in err.getvalue() and "tok/s=123" in err.getvalue()
    assert "train_step" in out.getvalue()  # through tqdm.write, to the log stream
    assert "2/4" not in out.getvalue()
    assert "train_step" not in err.getvalue()  # once, not also beside the bar
    assert out.getvalue().count("train_step") == 1
    # The log handler is back on the root logger after the bar closed.
    assert active_format() == "console"
