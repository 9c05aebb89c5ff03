"""The weights' shared memory (workers/shm.py) and the trainer's side of it
(trainer/policy.EngineWeights), without an engine."""

import errno
import multiprocessing
import os

import pytest
import safetensors.torch
import torch

from trainer.policy import EngineWeights, weights_image_size, weights_to_bytes
from workers import shm
from workers.shm import SHM_DIR


class TinyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(7, 4)
        self.proj = torch.nn.Linear(4, 3)


def test_a_file_named_after_its_owner_unlinked_then_closed(tmp_path, monkeypatch):
    monkeypatch.setenv(shm.OWNER_ENV, "4242")
    weights = shm.SharedWeights(100, 3, directory=tmp_path)
    assert weights.path.name.startswith(f"{shm.PREFIX}4242-{os.getpid()}-") and weights.path.stat().st_size == 100
    weights.buffer[:3] = b"abc"
    assert weights.handle() == shm.SharedWeightsHandle(str(weights.path), 100, 3)
    mapped = shm.map_shared(str(weights.path), 100)  # what an engine does
    weights.unlink()
    assert not weights.path.exists()
    weights.buffer[3:5] = b"de"  # both mappings still share the memory
    assert mapped[:5] == b"abcde"
    weights.close()
    weights.close()  # idempotent
    mapped.close()


def test_sweep_removes_only_the_owners_files(tmp_path):
    mine = [tmp_path / f"{shm.PREFIX}17-100-aa-weights", tmp_path / f"{shm.PREFIX}17-101-bb-weights"]
    others = [tmp_path / f"{shm.PREFIX}170-100-cc-weights", tmp_path / "psm_17"]
    for path in mine + others:
        path.write_bytes(b"x")
    assert shm.sweep(17, directory=tmp_path) == sorted(p.name for p in mine)
    assert sorted(tmp_path.iterdir()) == sorted(others)
    assert shm.sweep(17, directory=tmp_path) == []


def test_a_scratch_dir_is_named_after_the_run_and_swept_with_what_it_holds(tmp_path, monkeypatch):
    monkeypatch.setenv(shm.OWNER_ENV, "4243")
    scratch = shm.scratch_dir("engine0", directory=tmp_path)
    assert scratch.is_dir() and scratch.name.startswith(f"{shm.PREFIX}4243-{os.getpid()}-engine0-")
    assert shm.scratch_label(scratch.name) == "engine0"  # what the launcher's tmp_removed names
    dashed = shm.scratch_dir("eval-engine0", directory=tmp_path)
    assert shm.scratch_label(dashed.name) == "eval-engine0"
    (scratch / "vllm_dist_x").write_bytes(b"x")  # what a killed EngineCore leaves
    other = shm.scratch_dir("engine1", directory=tmp_path)
    monkeypatch.setenv(shm.OWNER_ENV, "42430")
    foreign = shm.scratch_dir("engine0", directory=tmp_path)
    assert shm.sweep(4243, directory=tmp_path) == sorted([scratch.name, other.name, dashed.name])
    assert list(tmp_path.iterdir()) == [foreign]


def test_no_room_is_an_error_that_leaves_no_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as raised:
        shm.SharedWeights(1 << 20, 1, directory=tmp_path)
    assert shm.no_room(raised.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shared_image_is_the_safetensors_bytes(dtype):
    model = TinyPolicy()
    size, tensors = weights_image_size(model, dtype)
    data = weights_to_bytes(model, dtype)
    assert (len(data), tensors) == (size, 3)
    out = EngineWeights(dtype)
    try:
        handle = out.write(model)
        assert (handle.size, handle.tensors) == (size, tensors)
        assert bytes(out.shared.buffer) == bytes(data)
        loaded = safetensors.torch.load(bytes(out.shared.buffer))
        assert set(loaded) == {"embed.weight", "proj.weight", "proj.bias"}
        assert all(t.dtype == dtype for t in loaded.values())
        assert torch.equal(loaded["proj.weight"], model.proj.weight.detach().to(dtype))
        with torch.no_grad():
            model.proj.weight.add_(1.0)
        assert out.write(model) == handle  # rewritten in place
        assert torch.equal(safetensors.torch.load(bytes(out.shared.buffer))["proj.weight"], model.proj.weight.detach().to(dtype))
        path = out.shared.path
        out.mapped()
        assert not path.exists()
    finally:
        out.close()
    assert out.shared is None


def test_without_room_in_dev_shm_the_weights_go_as_bytes(monkeypatch):
    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trainer.policy.SharedWeights", no_room)
    model = TinyPolicy()
    out = EngineWeights(torch.float32)
    data = out.write(model)
    assert isinstance(data, bytearray) and bytes(data) == bytes(weights_to_bytes(model, torch.float32))
    assert isinstance(out.write(model), bytearray)  # not tried again
    out.close()


@pytest.mark.serial  # sweeps every new segment in /dev/shm
def test_sweep_segments_removes_only_new_unused_segments_of_this_user():
    """vLLM's message queues live in multiprocessing shared memory (/dev/shm/psm_*); a
    SIGKILLed run leaves them. The launcher removes those made during the run that no
    live process maps or holds open."""
    from multiprocessing import shared_memory

    old = shared_memory.SharedMemory(create=True, size=4096)  # there before the run
    before = shm.segments()
    held = shared_memory.SharedMemory(create=True, size=4096)  # a live process maps it
    left = shared_memory.SharedMemory(create=True, size=4096)  # as a killed process leaves it:
    left_name = left.name.lstrip("/")
    left.close()  # unmapped and closed, the name still there
    opened = SHM_DIR / f"{shm.FOREIGN_PREFIXES[0]}test-open-{os.getpid()}"
    fd = os.open(opened, os.O_CREAT | os.O_RDWR, 0o600)  # held open, not mapped
    # A named semaphore, like the lock vLLM's executor shares with its worker: mapped
    # under glibc's temporary name, so only its inode tells it is in use.
    lock = multiprocessing.get_context("spawn").Lock()
    semaphore = {n for n in shm.segments() - before if n.startswith("sem.mp-")}
    try:
        assert len(semaphore) == 1
        assert {held.name.lstrip("/"), left_name, opened.name} <= shm.segments() - before
        assert shm.held_by([os.getpid()]) >= {held.name.lstrip("/"), opened.name, *semaphore}
        assert shm.sweep_segments(before) == [left_name]
        from multiprocessing import resource_tracker

        resource_tracker.unregister(left._name, "shared_memory")  # removed already: no warning at exit
        assert not (SHM_DIR / left_name).exists()
        assert (SHM_DIR / held.name.lstrip("/")).exists() and opened.exists()
        assert (SHM_DIR / old.name.lstrip("/")).exists()
        assert semaphore <= shm.segments()
    finally:
        del lock  # its finalizer unlinks it
        os.close(fd)
        opened.unlink()
        for seg in (old, held):
            seg.close()
            seg.unlink()


def test_release_removes_a_killed_engines_segments_but_not_ours():
    """Engine.shutdown kills the engine's processes, then removes the segments they held
    (and takes them off the resource tracker, which would warn about each at exit)."""
    from multiprocessing import shared_memory

    theirs = shared_memory.SharedMemory(create=True, size=4096)  # registered, as vLLM's are
    theirs.close()  # as its killed process leaves it
    ours = shared_memory.SharedMemory(create=True, size=4096)  # mapped here
    names = {theirs.name.lstrip("/"), ours.name.lstrip("/")}
    try:
        assert shm.release(names) == [theirs.name.lstrip("/")]
        assert not (SHM_DIR / theirs.name.lstrip("/")).exists()
        assert (SHM_DIR / ours.name.lstrip("/")).exists()
        assert shm.release(names) == []  # gone already: nothing to do, no error
    finally:
        ours.close()
        ours.unlink()
