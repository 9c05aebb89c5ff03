"""A vLLM general plugin (entry point `vllm.general_plugins` in setup.cfg): vLLM calls
`register()` in every process it runs, the EngineCore and worker processes it spawns
included, before it builds anything there."""

from __future__ import annotations

import atexit
import gc
import multiprocessing


def register() -> None:
    if multiprocessing.parent_process() is not None:  # EngineCore or its worker
        # At exit CPython's final garbage collection walks every object the process
        # holds (the model, torch's and vLLM's modules): 4-5 s each for EngineCore and
        # its worker on this machine, one after the other, longer than vLLM's 5 s
        # SIGTERM wait, so every normal engine shutdown ended in a SIGKILL 5 s late.
        # Frozen objects are skipped; the process's memory goes back to the system
        # anyway. vLLM tears down its own resources (queues, shared memory) before.
        atexit.register(gc.freeze)
