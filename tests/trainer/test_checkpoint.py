"""Checkpoints without an engine: atomic saves, checksums, keep-last-K, corruption
detection, and loading that never runs pickled code."""

import json
import os
import pickle
import concurrent.futures
import errno
import hashlib
import random
import stat
import zlib

import pytest
import safetensors
import safetensors.torch
import torch
from structlog.testing import capture_logs

from trainer import checkpoint as ckpt


class TiedModel(torch.nn.Module):
    """Two names for one weight, like an LM with tied embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.mid = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.mid(self.embed(x)))


def trained_model(seed=0):
    torch.manual_seed(seed)
    model = TiedModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(run_dir, step, model=None, opt=None, keep=3, **state):
    if model is None:
        model, opt = trained_model()
    return ckpt.save_checkpoint(
        run_dir, step, model=model, optimizer=opt, trainer_state={"policy_version": step, **state},
        config={"run": {"steps": 9}}, keep=keep,
    )


def test_save_writes_every_file_and_a_manifest_of_their_checksums(tmp_path):
    path = save(tmp_path, 4)
    assert path == tmp_path / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in path.iterdir()) == sorted([*ckpt.FILES, ckpt.MANIFEST])
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["step"] == 4 and set(manifest["files"]) == set(ckpt.FILES)
    for name, entry in manifest["files"].items():
        assert entry["crc32"] == f"{zlib.crc32((path / name).read_bytes()):08x}", name
        assert entry["bytes"] == (path / name).stat().st_size > 0
    assert json.loads((path / ckpt.TRAINER_STATE).read_text()) == {"policy_version": 4, "step": 4}
    assert json.loads((path / ckpt.CONFIG).read_text()) == {"run": {"steps": 9}}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_load_restores_weights_tied_weights_optimizer_and_rng(tmp_path):
    model, opt = trained_model(seed=0)
    torch.manual_seed(123)
    random.seed(456)
    path = save(tmp_path, 2, model, opt)
    expected_torch, expected_py = torch.rand(3), random.random()

    fresh, fresh_opt = TiedModel(), None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.embed.weight  # still one tensor
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for k, v in saved["state"].items():
        assert torch.equal(v["exp_avg_sq"], loaded["state"][k]["exp_avg_sq"])
        assert torch.equal(v["step"], loaded["state"][k]["step"])
    assert state["trainer_state"]["step"] == 2 and state["config"] == {"run": {"steps": 9}}
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_py


def test_a_checkpoint_directory_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = save(tmp_path, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert stat.S_IMODE((path / ckpt.MODEL).stat().st_mode) == 0o640


def test_only_the_last_k_are_kept(tmp_path):
    model, opt = trained_model()
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    with capture_logs() as logs:
        save(tmp_path, 6, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6]
    (event,) = [e for e in logs if e["event"] == "checkpoint_saved"]
    assert event["removed"] == [str(tmp_path / "checkpoints" / "step-00000004")]
    assert event["checkpoint_step"] == 6 and event["bytes"] > 0 and event["seconds"] >= 0


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_the_latest(tmp_path, monkeypatch):
    model, opt = trained_model()
    good = save(tmp_path, 1, model, opt)
    real_write = ckpt._write_bytes

    def crash_at_the_manifest(path, data):
        if path.name == ckpt.MANIFEST:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", crash_at_the_manifest)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, 2, model, opt)
    _only_the_first_is_left(tmp_path, good)  # its temporary directory cleaned up on the way out

    # A process killed mid-save cannot clean up: its temporary directory is ignored,
    # and removed by the next save.
    monkeypatch.undo()
    killed = tmp_path / "checkpoints" / ".tmp-step-00000002-abc"
    killed.mkdir()
    (killed / ckpt.MODEL).write_bytes(b"half")
    assert ckpt.latest_valid_checkpoint(tmp_path) == good
    save(tmp_path, 2, model, opt)
    assert not killed.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]


def test_every_file_is_on_disk_before_the_manifest_and_a_failed_fsync_fails_the_save(tmp_path, monkeypatch):
    # The big files are fsynced and hashed in threads while the next file is written:
    # the manifest (whose presence means complete) must still come after all of them.
    model, opt = trained_model()
    synced, at_manifest = [], []
    real_fsync, real_write = os.fsync, ckpt._write_bytes

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def write(path, data):
        if path.name == ckpt.MANIFEST:
            at_manifest.extend(synced)
        real_write(path, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "_write_bytes", write)
    good = save(tmp_path, 1, model, opt)
    assert set(ckpt.FILES) <= set(at_manifest), at_manifest
    assert ckpt.MANIFEST in synced

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(ckpt.OPTIMIZER):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        save(tmp_path, 2, model, opt)
    _only_the_first_is_left(tmp_path, good)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, opt = trained_model()
    save(tmp_path, 3, model, opt, note="first")
    path = save(tmp_path, 3, model, opt, note="second")
    assert json.loads((path / ckpt.TRAINER_STATE).read_text())["note"] == "second"
    ckpt.verify_checkpoint(path)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: _flip_byte(p / ckpt.MODEL), "model.safetensors: crc32"),
        (lambda p: _flip_byte(p / ckpt.OPTIMIZER), "optimizer.pt: crc32"),
        (lambda p: (p / ckpt.RNG).write_bytes((p / ckpt.RNG).read_bytes()[:-10]), "rng.pt has"),
        (lambda p: (p / ckpt.TRAINER_STATE).unlink(), "trainer_state.json is missing"),
        (lambda p: (p / ckpt.MANIFEST).unlink(), "no manifest.json"),
        (lambda p: (p / ckpt.MANIFEST).write_text("{not json"), "unreadable manifest.json"),
    ],
)
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage, reason):
    model, opt = trained_model()
    older = save(tmp_path, 1, model, opt)
    newer = save(tmp_path, 2, model, opt)
    damage(newer)
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.verify_checkpoint(newer)
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.load_checkpoint(newer, TiedModel())
    with capture_logs() as logs:
        assert ckpt.latest_valid_checkpoint(tmp_path) == older
    (event,) = [e for e in logs if e["event"] == "checkpoint_invalid"]
    assert event["path"] == str(newer) and event["checkpoint_step"] == 2 and reason in event["reason"]
    assert event["log_level"] == "warning"


def test_no_valid_checkpoint_means_none(tmp_path):
    assert ckpt.latest_valid_checkpoint(tmp_path) is None
    path = save(tmp_path, 1)
    _flip_byte(path / ckpt.MODEL)
    assert ckpt.latest_valid_checkpoint(tmp_path) is None


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_loading_never_runs_pickled_code(tmp_path, monkeypatch):
    """A checkpoint whose optimizer file holds a pickle that would run a command, with a
    manifest updated to match: the checksums pass, torch.load(weights_only=True) refuses."""
    monkeypatch.chdir(tmp_path)
    path = save(tmp_path, 1)
    (path / ckpt.OPTIMIZER).write_bytes(pickle.dumps({"state": _Payload()}, protocol=2))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.OPTIMIZER] = {
        "crc32": ckpt._crc32(path / ckpt.OPTIMIZER), "bytes": (path / ckpt.OPTIMIZER).stat().st_size,
    }
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    ckpt.verify_checkpoint(path)  # the checksums hold
    model = TiedModel()
    with pytest.raises(ckpt.CheckpointError, match="cannot load"):
        ckpt.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "PWNED").exists()


def test_weights_for_another_model_are_refused(tmp_path):
    path = save(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        ckpt.load_checkpoint(path, torch.nn.Linear(8, 8))


def _only_the_first_is_left(tmp_path, good):
    """After a failed save of step 2: the checkpoint of step 1 (`good`) is the only and
    the latest valid one, and no temporary directory is left."""
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ckpt.latest_valid_checkpoint(tmp_path) == good


def _flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_format_1_checkpoint_with_sha256_still_verifies_and_loads(tmp_path):
    """Checkpoints saved before format 2 carry sha256 sums: they resume as they did."""
    model, opt = trained_model()
    path = save(tmp_path, 1, model, opt)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["format"] = 1
    for name, entry in manifest["files"].items():
        entry.pop("crc32")
        entry["sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify_checkpoint(path)["format"] == 1
    fresh = TiedModel()
    ckpt.load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    assert torch.equal(fresh.mid.weight, model.mid.weight)
    _flip_byte(path / ckpt.OPTIMIZER)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: sha256"):
        ckpt.verify_checkpoint(path)
    manifest["format"] = 3
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="not a format-1/2 manifest"):
        ckpt.verify_checkpoint(path)


def _direct_write(path, pieces, chunk):
    """pieces through a _DirectFile of `chunk`-byte buffers; its crc32."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with ckpt._DirectFile(path, pool, chunk) as file:
            for piece in pieces:
                assert file.write(piece) == len(piece)
    return file.crc32


@pytest.mark.parametrize("sizes", [[], [1], [4095, 1], [8192], [8193], [3, 20000, 5, 8191, 1]])
def test_a_direct_file_holds_every_byte_written_and_their_crc32(tmp_path, monkeypatch, sizes):
    """Across the boundaries of its 8 KiB buffers and of 4 KiB blocks; straight to the
    disk where the file system allows it, through the page cache where it refuses (EINVAL)."""
    data = [os.urandom(n) for n in sizes]
    expected = b"".join(data)
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (opened.append(flags), real_open(p, flags, *a))[1])
    crc = _direct_write(tmp_path / "direct", [memoryview(d) for d in data], chunk=8192)
    assert (tmp_path / "direct").read_bytes() == expected
    assert crc == f"{zlib.crc32(expected):08x}"
    assert opened[0] & os.O_DIRECT  # this file system (the tests' tmp) takes O_DIRECT

    def refuse_direct(p, flags, *a):
        opened.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    opened.clear()
    monkeypatch.setattr(os, "open", refuse_direct)
    crc = _direct_write(tmp_path / "buffered", data, chunk=8192)
    assert (tmp_path / "buffered").read_bytes() == expected and crc == f"{zlib.crc32(expected):08x}"
    assert [bool(f & os.O_DIRECT) for f in opened] == [True, False]


def test_a_failed_write_fails_the_save_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_model()
    good = save(tmp_path, 1, model, opt)

    def full_disk(self, buffer, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt._DirectFile, "_write_out", full_disk)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, 2, model, opt)
    _only_the_first_is_left(tmp_path, good)


def test_the_streamed_safetensors_file_is_what_safetensors_reads(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32_strided": torch.randn(4, 6).t(),  # not contiguous
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "i64": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }
    with open(tmp_path / "m.safetensors", "wb") as f:
        ckpt._write_safetensors(f, tensors, metadata={"format": "pt"})
    loaded = safetensors.torch.load_file(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(TypeError, match="c: dtype torch.complex64"):
        ckpt._write_safetensors(open(tmp_path / "x", "wb"), {"c": torch.zeros(2, dtype=torch.complex64)}, {})


def test_a_checkpoint_verified_by_the_caller_is_not_read_again_for_its_checksums(tmp_path):
    """load_checkpoint(verified=True) trusts the caller's verification: a manifest whose
    sum no longer matches still loads that way, and is refused without it."""
    model, opt = trained_model()
    path = save(tmp_path, 1, model, opt)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.MODEL]["crc32"] = "00000000"
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: crc32"):
        ckpt.load_checkpoint(path, TiedModel())
    fresh = TiedModel()
    ckpt.load_checkpoint(path, fresh, verified=True)
    assert torch.equal(fresh.mid.weight, model.mid.weight)
