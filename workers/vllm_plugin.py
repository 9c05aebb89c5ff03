"""A vLLM general plugin (entry point `vllm.general_plugins` in setup.cfg): vLLM calls
`register()` in every process it runs, the EngineCore and worker processes it spawns
included, before it builds anything there."""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import uuid

from workers.shm import SCRATCH_ENV


def register() -> None:
    if multiprocessing.parent_process() is not None:  # EngineCore or its worker
        # At exit CPython's final garbage collection walks every object the process
        # holds (the model, torch's and vLLM's modules): 4-5 s each for EngineCore and
        # its worker on this machine, one after the other, longer than vLLM's 5 s
        # SIGTERM wait, so every normal engine shutdown ended in a SIGKILL 5 s late.
        # Frozen objects are skipped; the process's memory goes back to the system
        # anyway. vLLM tears down its own resources (queues, shared memory) before.
        atexit.register(gc.freeze)
        scratch = os.environ.get(SCRATCH_ENV)
        if scratch:
            _file_store_in(scratch)


def _file_store_in(directory: str) -> None:
    """vLLM's executors rendezvous through a torch FileStore at
    {tempfile.gettempdir()}/vllm_dist_<hex> (vllm/utils/network_utils.py), which a
    killed engine leaves in /tmp: the same file, in the engine's scratch directory
    instead, which its shutdown (or the launcher, after a kill) removes."""
    from vllm.v1.executor import multiproc_executor, uniproc_executor

    def init_method() -> str:
        return f"file://{directory}/vllm_dist_{uuid.uuid4().hex}"

    for module in (multiproc_executor, uniproc_executor):
        if hasattr(module, "get_file_store_init_method"):  # imported by name there
            module.get_file_store_init_method = init_method
