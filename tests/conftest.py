"""Shared fixtures. Engine start takes ~20-30 s on a laptop CPU: one engine per session."""

import os

# Without it the CPU engine reserves most of the machine's RAM for its KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts a real vLLM engine (slow: ~20-30 s per engine on CPU)")


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
