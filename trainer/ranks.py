"""Training across ranks: torch.distributed processes, each with an FSDP2 shard.

scripts/train.py starts trainer.ranks processes with torch's elastic agent (the
environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Rank 0 is the
trainer of a one-rank run: it owns the engines, the worker threads, the rollout queue and
the supervisor. Ranks 1..N-1 ("followers") hold their shard of the policy and the
optimizer state and do what rank 0 tells them, one command at a time:

    step        train on this share of the batch (a collective per micro-batch), step
                the shard, then take part in gathering the weights for the engines
    checkpoint  take part in gathering the full state dict (rank 0 writes it)
    model       take part in gathering the full weights (tests/ranks_step.py compares them)
    stop        exit with this code once rank 0 has exited

Commands travel through the process group's TCP store, not a collective: a follower
waits for rank 0's next batch however long generation takes (no collective timeout
trips) and checks every half second that rank 0 is alive, so a dead rank 0 ends it in
about a second. Rank 0 checks its followers the same way while it waits for rollouts.
Collectives (inside a step, a checkpoint) are bounded by trainer.collective_timeout_s;
on CPU gloo fails one at once when a peer dies.

A rank that fails writes what went wrong to RLT_RANKS_DIR/rank<r>.json (one record, the
fields of `run_failed`); the process that runs the agent reads them and logs the run's
one final `run_failed`, naming the rank and the cause (scripts/train.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.errors import ConfigError
from trainer.models import transformer_blocks
from workers.processes import pid_running

RANKS_DIR_ENV = "RLT_RANKS_DIR"  # where ranks write their failure records
_POLL_S = 0.5  # how often a waiting rank checks its peers


class PeerFailed(RuntimeError):
    """Another rank ended (died, or failed) while this one needed it."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torch's launcher sets them; (0, 1, 0) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def check_layout(cfg, gpus: int) -> None:
    """Raise ConfigError, naming the keys, for a device layout that cannot work: trainer
    ranks on GPUs 0..N-1, the engines on the rest (engine.devices, or every other GPU).
    `gpus`: the GPUs this machine has (0 on CPU)."""
    ranks, device = cfg.trainer.ranks, cfg.trainer.device
    if ranks == 1:
        return
    if gpus == 0:
        if device.startswith("cuda"):
            raise ConfigError(f"trainer.device={device} but this machine has no GPU", key="trainer.device")
        return
    if device not in ("auto", "cuda"):
        raise ConfigError(
            f"trainer.ranks={ranks} on GPUs: rank r trains on GPU r, so trainer.device must be auto or cuda, "
            f"not {device}", key="trainer.device",
        )
    if ranks > gpus:
        raise ConfigError(f"trainer.ranks={ranks} but this machine has {gpus} GPUs", key="trainer.ranks")
    engine_gpus = cfg.engine.devices if cfg.engine.devices else list(range(ranks, gpus))
    shared = sorted(set(engine_gpus) & set(range(ranks)))
    if not engine_gpus or shared or max(engine_gpus) >= gpus:
        raise ConfigError(
            f"trainer.ranks={ranks} takes GPUs 0..{ranks - 1} of {gpus}; engine.devices="
            f"{cfg.engine.devices} leaves the engines {engine_gpus or 'no GPU'}"
            + (f" (shared with trainer ranks: {shared})" if shared else ""),
            key="engine.devices" if cfg.engine.devices else "trainer.ranks",
        )


def is_peer_failure(e: BaseException) -> bool:
    """An error that says another rank is gone, not what went wrong first."""
    text = str(e).lower()
    return isinstance(e, (PeerFailed, dist.DistError)) or "connection closed by peer" in text or "gloo" in text


def write_failure_record(rank: int, fields: dict[str, Any], peer_failure: bool) -> None:
    """RLT_RANKS_DIR/rank<r>.json: this rank's failure, for the agent's final event."""
    folder = os.environ.get(RANKS_DIR_ENV)
    if not folder:
        return
    record = {**fields, "rank": rank, "time": time.time(), "peer_failure": peer_failure}
    tmp = pathlib.Path(folder) / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, pathlib.Path(folder) / f"rank{rank}.json")


def read_failure_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The failure records of a run's ranks, oldest first."""
    records = []
    for p in pathlib.Path(folder).glob("rank*.json"):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(records, key=lambda r: r.get("time", 0.0))


@dataclasses.dataclass
class Ranks:
    """This process's place among the training ranks. With one rank every method is a
    no-op and nothing distributed is started."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _store: Any = None
    _pids: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> PID
    _seq: int = 0  # commands sent (rank 0) or received (followers)
    _mesh: Any = None

    @classmethod
    def start(cls, device: torch.device, collective_timeout_s: float) -> Ranks:
        """Join the process group the launcher's environment describes (no-op for one rank)."""
        rank, world, local_rank = world_from_env()
        if world == 1:
            return cls()
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=collective_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        store = dist.PrefixStore("rlt/", dist.distributed_c10d._get_default_store())
        store.set(f"pid/{rank}", str(os.getpid()))
        pids = {}
        for r in range(world):  # every rank joined the group: its PID is there or coming
            store.wait([f"pid/{r}"], datetime.timedelta(seconds=collective_timeout_s))
            pids[r] = int(store.get(f"pid/{r}"))
        mesh = init_device_mesh(device.type, (world,))
        if device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        return cls(rank=rank, world=world, local_rank=local_rank, _store=store, _pids=pids, _mesh=mesh)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: `fully_shard` each transformer block (the classes the model lists in
        `_no_split_modules`), then the root. The training loop is unaware of it."""
        if self.world == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block, mesh=self._mesh)
        fully_shard(model, mesh=self._mesh)
        return model

    # ---- rank 0 -> followers ----------------------------------------------------------

    def send(self, kind: str, payloads: list[dict[str, Any]] | dict[str, Any] | None = None) -> None:
        """Rank 0: the next command, with one payload per follower or the same for all."""
        if self.world == 1:
            return
        for r in range(1, self.world):
            payload = payloads[r] if isinstance(payloads, list) else (payloads or {})
            self._store.set(f"cmd/{self._seq}/{r}", json.dumps({"kind": kind, **payload}))
        self._seq += 1

    def receive(self) -> dict[str, Any]:
        """A follower: rank 0's next command, waiting as long as it takes while rank 0
        lives; PeerFailed within about a second of rank 0's death."""
        key = f"cmd/{self._seq}/{self.rank}"
        checked = time.monotonic()
        while not self._store.check([key]):  # not store.wait: its timeouts log a warning each
            time.sleep(0.02)
            if time.monotonic() - checked > _POLL_S:
                if not pid_running(self._pids[0]):
                    raise PeerFailed(0, "rank 0 ended")
                checked = time.monotonic()
        command = json.loads(self._store.get(key))
        self._store.delete_key(key)
        self._seq += 1
        return command

    def check_peers(self) -> None:
        """Rank 0, between pieces of work: raise PeerFailed if a follower is gone."""
        for r, pid in self._pids.items():
            if r != self.rank and not pid_running(pid):
                raise PeerFailed(r, f"rank {r} (pid {pid}) ended")

    def wait_for_main_exit(self, timeout_s: float) -> None:
        """A follower told to stop: exit after rank 0, so rank 0's last log line is the run's."""
        deadline = time.monotonic() + timeout_s
        while pid_running(self._pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)

    # ---- collectives ------------------------------------------------------------------

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        """Sum ("sum") or maximum ("max") of each value over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def abort(self) -> None:
        """After an error on this rank: close its connections now, so that a peer waiting
        in a collective with it fails at once rather than when this process exits."""
        if self.world == 1 or not dist.is_initialized():
            return
        try:
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already failing; the original error matters
            pass

    def shutdown(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of each parameter, one at a time: a sharded parameter is
    gathered from every rank (a collective each rank must join, in this order) and the
    caller drops it before the next. A tied weight is listed once."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        t = p.detach()
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def split_by_tokens(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` split into `parts` lists with near-equal sums: the largest
    first, each to the lightest part (each part's indices in ascending order)."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        p = min(range(parts), key=lambda p: (loads[p], p))
        out[p].append(i)
        loads[p] += sizes[i]
    return [sorted(o) for o in out]


def grad_norm_value(norm: Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor when parameters are sharded)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

