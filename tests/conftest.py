"""Shared fixtures, and the order and exclusion that let the suite run on two workers.

Engine start takes ~20-30 s on a laptop CPU: one engine per session (per worker).

`make test` runs two pytest-xdist workers: most of a test's time is spent importing
vLLM in the processes an engine spawns, one core at a time, so two tests at once keep
both cores busy. A test marked `serial` runs alone: it asserts a wall-clock limit that
another test's load could break, or machine-wide state (every file in /dev/shm or /tmp)
that another test's engine changes. Without xdist nothing here changes how tests run.
"""

import contextlib
import fcntl
import os
import pathlib
import tempfile
import time

# Without it the CPU engine reserves most of the machine's RAM for its KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

# Longer than any test may run (pytest-timeout ends one at setup.cfg's 600 s).
SERIAL_WAIT_LIMIT_S = 900.0


def pytest_collection_modifyitems(config, items):
    """Serial tests first, then the longest file's, then the other engine tests, then the rest.

    xdist's worksteal (the Makefile's) gives the first worker the first half of this
    order, the second worker the other half, and an idle worker the tail of the other's
    queue. So the serial tests run first, each waiting for at most one short test of
    the other worker (never for test_resume_engine's eight-process scenario), that
    scenario starts right after them, and the short tests fill both workers at the end."""
    def rank(item):
        serial = item.get_closest_marker("serial") is not None
        engine = item.get_closest_marker("engine") is not None
        longest = item.path.name == "test_resume_engine.py"
        return (not serial, not longest, not engine)

    items.sort(key=rank)  # stable: file order within each rank


class SerialLock:
    """A reader-writer lock over the xdist workers of one run (flock on two files): a
    serial test holds the room exclusively, every other test shares it. A serial test
    waiting for the room holds the turnstile, so the other worker starts no new test
    meanwhile and the serial one gets the room when the test in progress ends."""

    def __init__(self, directory: pathlib.Path, run_id: str):
        self._turnstile = open(directory / f"pytest-{run_id}.turnstile", "a")
        self._room = open(directory / f"pytest-{run_id}.room", "a")

    def remove(self) -> None:
        for f in (self._turnstile, self._room):
            f.close()
            pathlib.Path(f.name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def hold(self, exclusive: bool):
        _flock(self._turnstile, fcntl.LOCK_EX)
        try:
            _flock(self._room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)


def _flock(f, operation: int) -> None:
    deadline = time.monotonic() + SERIAL_WAIT_LIMIT_S
    while True:
        try:
            fcntl.flock(f, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other test worker held {f.name} for {SERIAL_WAIT_LIMIT_S:.0f} s") from None
            time.sleep(0.05)


def pytest_configure(config):
    worker = getattr(config, "workerinput", None)  # set in an xdist worker
    config._serial_lock = SerialLock(pathlib.Path(tempfile.gettempdir()), worker["testrunuid"]) if worker else None


def pytest_unconfigure(config):
    # A worker that is done takes no lock again; the other keeps its open files.
    if config._serial_lock is not None:
        config._serial_lock.remove()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around a test's setup, call and teardown (session fixtures it starts included)."""
    lock = item.config._serial_lock
    if lock is None:
        yield
        return
    with lock.hold(exclusive=item.get_closest_marker("serial") is not None):
        yield


@pytest.fixture(scope="session")
def tiny_model_path():
    from trainer.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path):
    """One float32 engine shared by the session: float32 so that greedy decoding matches torch."""
    from workers.engine import Engine

    engine = Engine(tiny_model_path, dtype="float32", max_model_len=512, max_num_seqs=16)
    yield engine
    engine.shutdown()


@pytest.fixture
def fake_engine(monkeypatch):
    """The Trainer builds tests/fake_engine.FakeEngine instead of vLLM engines."""
    import trainer.trainer as trainer_mod
    from tests.fake_engine import FakeEngine

    FakeEngine.instances = []
    monkeypatch.setattr(trainer_mod, "engine_class", lambda: FakeEngine)
    return FakeEngine
