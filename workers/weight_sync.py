"""Weight sync into a running vLLM engine; this module runs in vLLM's worker process.

Two ways in, both loading checkpoint-format weights (HF names, already in the engine's
dtype) through vLLM's layer-wise reload:

* Shared memory (the default, every device): a weight-transfer backend, `rlt_shm`,
  written to vLLM's own interface (`vllm.distributed.weight_transfer`) and registered
  when vLLM imports this module in its worker process (it is the worker extension, so
  the import happens before the model loads). The trainer writes a safetensors image
  into a /dev/shm file (workers/shm.py); `init_weight_transfer_engine` maps it once,
  and each sync is vLLM's standard `start_weight_update` / `update_weights` /
  `finish_weight_update` over tensors that are views of the mapping: nothing big
  crosses the RPC socket. vLLM's NCCL backend for GPUs speaks the same calls.
  The three run inside one RPC (`WeightSyncExtension.update_weights_atomically`):
  between `start` (which moves the layers to the meta device for the layer-wise
  reload) and `finish`, an engine step with requests in flight would run on meta
  tensors and kill the engine, and EngineCore steps between two RPCs.
* Bytes (the fallback when /dev/shm has no room, and the benchmark's old path):
  `WeightSyncExtension.load_weights_from_bytes`, the safetensors image pickled
  through `collective_rpc`.
"""

from __future__ import annotations

import dataclasses
import json
import time

import safetensors.torch
import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.platforms import current_platform

from workers.shm import SAFETENSORS_DTYPES, map_shared, unmap

WORKER_EXTENSION = f"{__name__}.WeightSyncExtension"
SHM_BACKEND = "rlt_shm"


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """vLLM 0.32 on CPU: the LM head computes logits with a packed copy of its weight
    (`cpu_linear`, made by process_weights_after_loading). With tied embeddings no
    checkpoint tensor is loaded into the head itself, so a reload never re-packs it and
    logits would keep using the old embedding."""
    if current_platform.is_cpu():
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and hasattr(lm_head, "cpu_linear"):
            lm_head.quant_method.process_weights_after_loading(lm_head)


def safetensors_views(buffer) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors image in `buffer`, as views of it (no copy)."""
    head_len = int.from_bytes(buffer[:8], "little")
    header = json.loads(bytes(buffer[8 : 8 + head_len]))
    start = 8 + head_len
    views = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(buffer, dtype=dtype, offset=start + begin, count=count) if count else torch.empty(0, dtype=dtype)
        views.append((name, flat.view(entry["shape"])))
    return views


@dataclasses.dataclass
class SharedMemoryInitInfo(WeightTransferInitInfo):
    path: str  # the trainer's /dev/shm file
    size: int  # its size in bytes


@dataclasses.dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    """Nothing: the image's layout is fixed for the run and read at init."""


class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
    """vLLM weight-transfer backend over a shared-memory file the trainer rewrites
    before each sync (and never while one runs: it waits for every engine's
    acknowledgement). The layer-wise reload copies each tensor into the engine's own
    parameters (and on CPU repacks it), so nothing keeps a view once a sync is done."""

    init_info_cls = SharedMemoryInitInfo
    update_info_cls = SharedMemoryUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._mapping = None
        self._tensors: list[tuple[str, torch.Tensor]] = []

    def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
        self.shutdown()
        self._mapping = map_shared(init_info.path, init_info.size)
        self._tensors = safetensors_views(self._mapping)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        if self._mapping is None:
            raise RuntimeError("rlt_shm: update_weights before init_weight_transfer_engine")
        self.model.load_weights(iter(self._tensors))

    def update_weights(self, update_info) -> None:
        # The base class ends with torch.accelerator.synchronize(), which a CPU build
        # of torch lacks a backend for; a CPU tensor copy needs no synchronization.
        self.receive_weights(self.parse_update_info(update_info))
        if not current_platform.is_cpu():
            torch.accelerator.synchronize()

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        _repack_tied_lm_head(self.model)

    def shutdown(self) -> None:
        self._tensors = []  # the views first: a mapping with live views cannot close
        if self._mapping is not None:
            unmap(self._mapping)
            self._mapping = None


try:
    WeightTransferEngineFactory.register_engine(SHM_BACKEND, SharedMemoryWeightTransferEngine)
except ValueError:  # registered already (this module imported twice under one name)
    pass


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`EngineArgs(worker_extension_cls=WORKER_EXTENSION)`);
    the front end calls its methods by name through `LLMEngine.collective_rpc`."""

    def update_weights_atomically(self, update_info: dict) -> dict[str, float]:
        """start_weight_update + update_weights + finish_weight_update in one call, so
        that no engine step runs in between; returns each phase's seconds."""
        phases = {}
        for phase, call in (
            ("start", self.start_weight_update),
            ("update", lambda: self.update_weights(update_info)),
            ("finish", self.finish_weight_update),
        ):
            t0 = time.perf_counter()
            call()
            phases[phase] = time.perf_counter() - t0
        return phases

    def load_weights_from_bytes(self, data: bytes | bytearray) -> int:
        """Load a safetensors image sent as bytes; returns the tensor count.

        Bytes, because `collective_rpc` serializes its arguments with msgpack and does
        not rebuild tensors (they arrive as nested lists), and shipping a pickled
        function would need vLLM's insecure-serialization flag."""
        tensors = safetensors.torch.load(bytes(data) if not isinstance(data, bytes) else data)
        # Not `model.load_weights`: on CPU the backend repacks linear weights into its
        # kernel layout after loading and leaves the original parameters empty, so a
        # plain load_weights writes into nothing. `reload_weights` (vLLM's Worker, 0.32)
        # re-runs the layer-wise load-and-process path.
        self.reload_weights(weights_iterator=iter(tensors.items()))
        _repack_tied_lm_head(self.model_runner.get_model())
        return len(tensors)
