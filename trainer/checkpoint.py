"""Checkpoints: atomic, checksummed, the last K kept; loading never unpickles code.

Layout: RUN_DIR/checkpoints/step-00000012/ holds
    model.safetensors   the policy's weights (safetensors; tied weights stored once)
    optimizer.pt        the optimizer's state, keyed by parameter name (tensors and plain data only)
    rng.pt              RNG states: torch CPU, CUDA (if any), Python's `random`
    trainer_state.json  step, policy version, which prompts were trained, run id
    config.json         the resolved config (TrainerConfig.to_dict())
    manifest.json       sha256 and size of every file above; written last

Saving writes everything into a temporary sibling directory (`.tmp-step-...`), fsyncs
each file and the directory, renames it into place and fsyncs the parent: a crash at
any moment leaves either the complete checkpoint or none (plus a `.tmp-*` directory the
next save removes). Loading verifies every checksum first; `torch.load` runs with
`weights_only=True`, so a tampered file cannot execute code.

With trainer ranks (FSDP2 shards) every rank calls save and load: saving gathers the
full state to rank 0, which writes the same files as a one-rank run; loading reads them
on rank 0 and sends each rank its shard. A checkpoint saved with N ranks resumes with M.

    path = save_checkpoint(run_dir, step=12, model=m, optimizer=o, trainer_state=s, config=c, keep=2)
    path = latest_valid_checkpoint(run_dir)       # None if there is none; logs each bad one
    state = load_checkpoint(path, model, optimizer)

run.keep_best: RUN_DIR/checkpoints/best.json names the checkpoint of the best evaluation
({"step", "metric", "value", "path"}); pruning keeps it beside the newest K.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
import time
from typing import Any

import safetensors.torch
import structlog
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = structlog.get_logger(__name__)

FORMAT = 1
CHECKPOINTS = "checkpoints"  # subdirectory of the run's output_dir
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"
FILES = (MODEL, OPTIMIZER, RNG, TRAINER_STATE, CONFIG)
BEST = "best.json"  # in the checkpoints directory: the best checkpoint (run.keep_best)
_NAME = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing file, checksum mismatch, bad manifest."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def checkpoint_root(output_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(output_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """(step, path) of every checkpoint directory under output_dir, oldest first;
    valid or not (temporary directories excluded)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---- saving ------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from (the engines' requests are seeded per prompt)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> pathlib.Path | None:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep`
    checkpoints. `trainer_state` must be JSON-able. Returns the checkpoint's path.
    With sharded parameters every rank calls this; rank 0 writes, the others get None."""
    model_state, optimizer_state = full_state(model, optimizer)
    if _rank() != 0:
        return None
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    name = checkpoint_name(step)
    t0 = time.monotonic()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    follow_umask(tmp)  # mkdtemp makes it 0700; a checkpoint follows the umask like any file
    try:
        # Each file is hashed and fsynced in the pool while the next one is written (both
        # release the GIL): SmolLM2's 1.6 GB then cost the writes plus the optimizer
        # file's hash, not writes, fsyncs and hashes one after another.
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="checkpoint") as pool:
            # format "pt": what transformers asks of a safetensors file; RUN_DIR/model links this one.
            safetensors.torch.save_file(model_state, str(tmp / MODEL), metadata={"format": "pt"})
            digests = {MODEL: pool.submit(_fsync_and_hash, tmp / MODEL)}
            _torch_save(optimizer_state, tmp / OPTIMIZER)
            digests[OPTIMIZER] = pool.submit(_fsync_and_hash, tmp / OPTIMIZER)
            _torch_save(rng_state(), tmp / RNG)
            _write_bytes(tmp / TRAINER_STATE, _json_bytes({**trainer_state, "step": step}))
            _write_bytes(tmp / CONFIG, _json_bytes(config))
            for f in (RNG, TRAINER_STATE, CONFIG):  # small ones
                digests[f] = pool.submit(_fsync_and_hash, tmp / f)
            files = {f: {"sha256": digests[f].result(), "bytes": (tmp / f).stat().st_size} for f in FILES}
        manifest = {
            "format": FORMAT,
            "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "files": files,
        }
        _write_bytes(tmp / MANIFEST, _json_bytes(manifest))  # last: its presence means complete
        for f in (*FILES, MANIFEST):
            follow_umask(tmp / f)  # safetensors writes 0600
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            old = root / f".tmp-old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    removed = prune_checkpoints(output_dir, keep)
    log.info(
        "checkpoint_saved",
        path=str(final),
        checkpoint_step=step,
        seconds=round(time.monotonic() - t0, 3),
        bytes=sum(f["bytes"] for f in files.values()),
        removed=[str(p) for p in removed],
    )
    return final


# Unsharded, on CPU; with shards, gathered to rank 0 (the other ranks get empty dicts).
_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The unsharded model and optimizer state on CPU, keyed by parameter name (a tied
    weight once). Sharded: a collective every rank joins; rank 0 gets the state, the
    others empty dicts."""
    return full_weights(model), get_optimizer_state_dict(model, optimizer, options=_GATHERED)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (a tied weight once); sharded: as `full_state`."""
    names = _state_names(model)
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=_GATHERED).items() if k in names}


def _state_names(model: torch.nn.Module) -> set[str]:
    """What a checkpoint holds: parameters (`named_parameters` lists a tied weight once)
    and persistent buffers."""
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n for n, _ in model.named_parameters()} | buffers


def follow_umask(path: pathlib.Path) -> None:
    """Give a file (0666) or directory (0777) the mode the umask makes of it: for what
    was created with a fixed one (mkdtemp's 0700, safetensors' 0600)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    try:  # read, not set: os.umask() would race other threads creating files
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def read_best(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The best checkpoint's record (best.json), or None if there is none or it is
    unreadable (a checkpoint is not lost for it: the newest K are kept as ever)."""
    try:
        best = json.loads((checkpoint_root(output_dir) / BEST).read_text())
        int(best["step"]), float(best["value"])
        return best
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_best(output_dir: str | os.PathLike, step: int, metric: str, value: float, keep: int) -> dict[str, Any]:
    """Record the checkpoint of `step` (saved already) as the best, atomically, then prune
    (the previous best is no longer kept unless it is among the newest `keep`)."""
    root = checkpoint_root(output_dir)
    best = {"step": step, "metric": metric, "value": value, "path": str(root / checkpoint_name(step))}
    tmp = root / f".tmp-{BEST}"
    _write_bytes(tmp, _json_bytes(best))
    os.replace(tmp, root / BEST)
    _fsync_dir(root)
    prune_checkpoints(output_dir, keep)
    return best


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[pathlib.Path]:
    """Delete all but the newest `keep` checkpoints (by step) and the best one (best.json,
    run.keep_best). Returns what was removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    best = read_best(output_dir)
    old = [p for step, p in list_checkpoints(output_dir)[:-keep] if best is None or step != int(best["step"])]
    for p in old:
        # Renamed out of the checkpoint namespace first, so a crash mid-delete never
        # leaves a half-deleted directory that looks like a checkpoint.
        trash = p.with_name(f".tmp-del-{p.name}-{os.getpid()}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return old


def _remove_stale_temporaries(root: pathlib.Path) -> None:
    # Left by a save or delete that was killed midway; one writer per output_dir.
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _torch_save(obj: Any, path: pathlib.Path) -> None:
    """Written, not fsynced: save_checkpoint fsyncs it with its hash."""
    with open(path, "wb") as f:  # straight to the file: no second copy of a large state in memory
        torch.save(obj, f)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_and_hash(path: pathlib.Path) -> str:
    """The file's sha256, once it is on disk."""
    digest = _sha256(path)  # first: its pages are still in the cache while they are written back
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- finding and verifying -------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's manifest, after checking that every file it lists is there with
    its size and sha256. Raises CheckpointError saying what is wrong."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(path, f"no {MANIFEST} (the save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"unreadable {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(path, f"{MANIFEST} is not a format-{FORMAT} manifest")
    missing = [f for f in FILES if f not in manifest["files"]]
    if missing:
        raise CheckpointError(path, f"{MANIFEST} does not list {', '.join(missing)}")
    for name, expected in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(path, f"{name} is missing")
        size = f.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(path, f"{name} has {size} bytes, the manifest says {expected.get('bytes')}")
        digest = _sha256(f)
        if digest != expected.get("sha256"):
            raise CheckpointError(path, f"{name}: sha256 {digest[:12]}... does not match the manifest's {str(expected.get('sha256'))[:12]}...")
    return manifest


def latest_valid_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The newest checkpoint under output_dir whose checksums hold, or None. Each newer
    one that fails verification is logged (`checkpoint_invalid`, with the path and the
    reason) and skipped."""
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("checkpoint_invalid", path=str(path), checkpoint_step=step, reason=e.reason)
            continue
        return path
    return None


# ---- loading -----------------------------------------------------------------------------


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint (step, policy version, prompts), without its
    weights: what a resumed run needs before its engines start."""
    try:
        return json.loads((pathlib.Path(path) / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"{TRAINER_STATE} does not load: {e}") from e


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Verify the checkpoint, load the weights into `model` and the state into
    `optimizer` (either may be None), and return {"trainer_state", "rng", "config"}.
    Raises CheckpointError on a bad checkpoint."""
    path = pathlib.Path(path)
    verify_checkpoint(path)
    # Sharded: rank 0 reads the files and sends each rank its shard (the others pass {}).
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    reads = not sharded or _rank() == 0
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded, strict=False)
    try:
        if model is not None:
            weights = safetensors.torch.load_file(str(path / MODEL)) if reads else {}
            if reads:
                names = _state_names(model)
                missing, unexpected = names - set(weights), set(weights) - names
                if missing or unexpected:
                    raise CheckpointError(
                        path, f"weights do not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                    )
            set_model_state_dict(model, weights, options=opts)
        if optimizer is not None:
            state = torch.load(path / OPTIMIZER, map_location=map_location, weights_only=True) if reads else {}
            if reads and state["param_groups"] and isinstance(state["param_groups"][0]["params"][0], int):
                optimizer.load_state_dict(state)  # an older checkpoint, keyed by position (one rank)
            else:
                tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
                set_optimizer_state_dict(model, optimizer, state, options=opts)
                for group, keys in zip(optimizer.param_groups, tuples):  # betas come back as lists
                    group.update({k: tuple(group[k]) for k in keys})
        rng = torch.load(path / RNG, map_location="cpu", weights_only=True)
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        config = json.loads((path / CONFIG).read_text())
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - checksums held, yet the content does not load
        raise CheckpointError(path, f"cannot load: {type(e).__name__}: {e}") from e
    return {"trainer_state": trainer_state, "rng": rng, "config": config}
