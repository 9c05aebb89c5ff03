"""Adapter over one `vllm.LLMEngine` (V1, multiprocess mode): the only vLLM surface the
worker thread uses.

Threading: `submit`, `step`, `abort`, `num_unfinished` and `load_weights` belong to the
one thread that owns the engine (vLLM's engine is not thread-safe). `is_alive`,
`process_pids`, `wake_blocked` and `shutdown` may be called from any thread: they are
what a watchdog uses to free an owner thread stuck inside `step` or `load_weights` after
the engine died.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch
import vllm
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError

from workers.hardware import engine_dtype
from workers.processes import running
from workers import shm
from workers.shm import SharedWeightsHandle
from workers.weight_sync import SHM_BACKEND, WORKER_EXTENSION

logger = logging.getLogger(__name__)

# vLLM edits os.environ while it builds an engine, and so do we (the KV cache size,
# the scratch directory).
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _environ(**values: str):
    """os.environ with `values` set, restored after: what the engine processes, spawned
    meanwhile, inherit. Under _BUILD_LOCK."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _scratch_environ(scratch: str) -> dict[str, str]:
    """Where a killed engine's leftovers in /tmp go instead: the ZeroMQ sockets its
    processes bind (VLLM_RPC_BASE_PATH) and the torch FileStore that its executor
    rendezvous through (workers/vllm_plugin.py reads shm.SCRATCH_ENV). Not TMPDIR:
    torch's compile cache puts its precompiled headers under tempfile's directory
    whatever TORCHINDUCTOR_CACHE_DIR says, and a new directory per engine rebuilt them
    at every start (the first batch 5 s late)."""
    return {"VLLM_RPC_BASE_PATH": scratch, shm.SCRATCH_ENV: scratch}


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each sampled token
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort"
    # (version, start, end): tokens [start, end) were sampled under weights `version`,
    # as labelled by `Engine.load_weights(..., version=)`; "default" before any label.
    weight_versions: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class FinishedRequest:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]  # n of them: one GRPO group


class _ClientInternals:
    """Every private piece of vLLM this module touches, looked up once at engine start
    so that a vLLM upgrade that renames them fails at start, loudly, not at the first
    engine death.

    vLLM 0.32, vllm/v1/engine/core_client.py (MPClient, SyncMPClient) and
    vllm/v1/engine/utils.py (CoreEngineProcManager):
      client.resources.engine_dead         set within ~40 ms by the client's monitor
                                           thread when an EngineCore process dies; set
                                           by us before we kill the processes
      client.resources.engine_manager.processes
                                           the EngineCore multiprocessing.Process(es)
      client.outputs_queue                 LLMEngine.step() blocks in get() on it, with
                                           no timeout; nothing is put on it at death
      client.utility_results               call_id -> Future; collective_rpc blocks in
                                           future.result() with no timeout
    """

    def __init__(self, client: object):
        try:
            self._resources = client.resources
            self.engine_dead()  # fails here, not at the first death, if the flag is gone
            self.processes = list(self._resources.engine_manager.processes)
            self._outputs_queue = client.outputs_queue
            self._utility_results = client.utility_results
        except AttributeError as e:
            raise RuntimeError(
                f"vLLM {vllm.__version__}: the engine client {type(client).__name__} lacks an "
                f"attribute workers/engine.py relies on to detect and unblock a dead engine "
                f"({e}); update _ClientInternals for this vLLM version"
            ) from e
        if not isinstance(self._outputs_queue, queue.Queue) or not isinstance(self._utility_results, dict):
            raise RuntimeError(
                f"vLLM {vllm.__version__}: {type(client).__name__}.outputs_queue / utility_results "
                "changed type; update _ClientInternals for this vLLM version"
            )

    def engine_dead(self) -> bool:
        return bool(self._resources.engine_dead)

    def mark_shutting_down(self) -> None:
        """What vLLM's own shutdown does first (BackgroundResources.__call__): its
        monitor thread then takes the processes' deaths as expected."""
        self._resources.engine_dead = True

    def wake_threads_blocked(self) -> None:
        """Raise EngineDeadError in every thread blocked in step() or collective_rpc."""
        self._outputs_queue.put_nowait(EngineDeadError())
        for future in list(self._utility_results.values()):
            if not future.done():
                try:
                    future.set_exception(EngineDeadError())
                except Exception:  # InvalidStateError: resolved concurrently
                    pass


class Engine:
    """One vLLM engine: submit groups of `n` samples, step, sync weights, shut down.

    `logprobs_mode` is "processed_logprobs" so that the returned behaviour log-probs are
    those of the distribution actually sampled (after temperature and top-p); with
    temperature 1 and top-p 1 it equals the raw log-probs.
    `kvcache_gib` sizes the KV cache on CPU; on a GPU `gpu_memory_utilization` does.
    Prefix caching is off: after a weight sync the cached prefix blocks would hold KV
    computed with the old weights and new requests would silently reuse it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        index: int = 0,
        kvcache_gib: int = 1,
        max_model_len: int = 1024,
        max_num_seqs: int = 64,
        seed: int = 0,
        dtype: str = "auto",
        logprobs_mode: str = "processed_logprobs",
        device_id: int | None = None,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = True,
    ):
        self.index = index
        args = EngineArgs(
            **engine_kwargs(
                model_path,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                seed=seed,
                dtype=dtype,
                logprobs_mode=logprobs_mode,
                device_id=device_id,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
            )
        )
        self._pending: dict[str, list[int]] = {}
        self._shared_path: str | None = None  # the shared weights the engine has mapped
        self.last_load_s: dict[str, float] = {}  # seconds per phase of the last weight load
        self._shutdown_lock = threading.Lock()
        self._closed = False
        started = time.monotonic()
        self._scratch = shm.scratch_dir(f"engine{index}")
        try:
            with _BUILD_LOCK, _environ(
                VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib),  # read on CPU only
                **_scratch_environ(str(self._scratch)),
            ):
                self._llm = LLMEngine.from_engine_args(args, enable_multiprocessing=True)
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        try:
            self._internals = _ClientInternals(self._llm.engine_core)
            self._processes = _with_descendants(self._internals.processes)
            # Their message queues' shared memory, made at start: shutdown() removes it.
            self._segments = shm.held_by(self.process_pids())
        except BaseException:
            self._llm.engine_core.shutdown()
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        self.dtype: torch.dtype = self._llm.model_config.dtype
        self.start_seconds = time.monotonic() - started
        logger.info(
            "engine %d started in %.1f s on %s (dtype %s, pids %s)",
            index, self.start_seconds, current_platform.device_type, self.dtype, self.process_pids(),
        )

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> None:
        """Queue one group: `n` samples of the prompt. A prompt that does not fit in
        max_model_len raises ValueError here."""
        if request_id in self._pending:
            raise ValueError(f"request {request_id!r} is already in flight")
        params = SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,  # child i of the group gets seed + i
            logprobs=0,  # only the sampled token's log-prob
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        try:
            (prompt,) = self._llm.renderer.render_cmpl([{"prompt_token_ids": list(prompt_token_ids)}])
        except VLLMValidationError as e:
            raise ValueError(f"request {request_id!r}: {e}") from e
        self._llm.add_request(request_id, prompt, params)
        self._pending[request_id] = list(prompt_token_ids)

    def step(self) -> list[FinishedRequest]:
        """One engine step; returns the groups that finished in it (often none)."""
        self._raise_if_dead()
        # With nothing in flight the engine sends nothing and step() would block forever.
        if not self._llm.has_unfinished_requests():
            return []
        finished = []
        for out in self._llm.step():
            if not out.finished:
                continue
            prompt = self._pending.pop(out.request_id, None)
            if prompt is None:  # aborted while its last output was on the way
                continue
            finished.append(
                FinishedRequest(out.request_id, prompt, [_completion(c) for c in out.outputs])
            )
        return finished

    def num_unfinished(self) -> int:
        """Groups submitted and neither returned by step() nor aborted."""
        return len(self._pending)

    def abort(self, request_ids: list[str]) -> None:
        self._llm.abort_request(list(request_ids))
        for request_id in request_ids:
            self._pending.pop(request_id, None)

    def load_weights(self, weights: bytes | bytearray | SharedWeightsHandle, version: int | str | None = None) -> int:
        """Replace the weights with a safetensors image (HF names, already in
        `self.dtype`): a shared-memory file the trainer wrote (workers/shm.py), mapped
        by the engine the first time it is seen, or the bytes themselves.

        Requests in flight continue on the new weights; `version` labels the tokens
        sampled from now on (see Completion.weight_versions). Returns the tensor count.
        """
        self._raise_if_dead()
        rpc, phases = self._llm.collective_rpc, {}
        t0 = time.perf_counter()
        if isinstance(weights, SharedWeightsHandle):
            if self._shared_path != weights.path:
                rpc("init_weight_transfer_engine", args=({"path": weights.path, "size": weights.size},))
                self._shared_path = weights.path
                phases["init"] = time.perf_counter() - t0
            # vLLM's weight-transfer protocol in one RPC (workers/weight_sync.py):
            # start = layer-wise reload set up, update = copy from the mapping into the
            # parameters, finish = kernel processing (on CPU: repacking).
            t = time.perf_counter()
            phases.update(rpc("update_weights_atomically", args=({},))[0])
            phases["rpc"] = time.perf_counter() - t - sum(phases[p] for p in ("start", "update", "finish"))
            count = weights.tensors
        else:
            count = rpc("load_weights_from_bytes", args=(weights,))[0]
            phases["bytes"] = time.perf_counter() - t0
        if version is not None:
            self._llm.engine_core.set_weight_version(str(version))
        self.last_load_s = phases
        return count

    def is_alive(self) -> bool:
        """Never blocks: the dead flag vLLM's monitor sets, and the processes themselves."""
        if self._closed or self._internals.engine_dead():
            return False
        return all(running(p) for p in self._processes)

    def _raise_if_dead(self) -> None:
        # vLLM would block forever in a call made after the engine died (a watchdog's
        # wake_blocked() frees only the calls already waiting), and its own dead flag
        # can lag the process's death.
        if not self.is_alive():
            raise EngineDeadError()

    def process_pids(self) -> list[int]:
        """EngineCore first, then the processes it had started once the engine was up."""
        return [p.pid for p in self._processes]

    def wake_blocked(self) -> None:
        """Make a thread blocked in step() or load_weights() raise EngineDeadError.

        vLLM 0.32 leaves such a thread blocked forever when EngineCore dies; a watchdog
        calls this once is_alive() turns False. On a live engine it would make the next
        step() fail, so only call it on an engine being given up.
        """
        self._internals.wake_threads_blocked()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine: SIGKILL its processes by PID, remove the shared memory they
        leave, close vLLM's client; within about `timeout` s. Idempotent.

        No graceful stop: the engine holds nothing the run still needs (its requests
        are aborted or done, its weights are the trainer's), and vLLM's own stop, SIGTERM
        then a wait, took 2.2 s for the tiny model here (#15), most of a run's ending.
        """
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        pids = self.process_pids()
        segments = self._segments | shm.held_by(pids)
        # vLLM's monitor thread takes an engine process's death for a failure and logs
        # it, unless the client is already marked as going down.
        self._internals.mark_shutting_down()
        alive = _signal_and_wait(self._processes, psutil.Process.kill, time.monotonic() + _KILL_WAIT_S)
        if alive:
            logger.error("engine %d: processes still alive after SIGKILL: %s", self.index, [p.pid for p in alive])
        # The client's side (sockets, the process manager): quick once the processes are
        # gone; in a thread, so that a surprise in vLLM cannot hold this call.
        stopper = threading.Thread(
            target=self._llm.engine_core.shutdown, kwargs={"timeout": 1.0},
            name=f"engine-{self.index}-shutdown", daemon=True,
        )
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        if stopper.is_alive():
            logger.warning("engine %d: vLLM's client shutdown did not finish in time", self.index)
        self._internals.wake_threads_blocked()
        removed = shm.release(segments)
        shutil.rmtree(self._scratch, ignore_errors=True)
        logger.debug("engine %d: stopped; removed shared memory %s", self.index, removed)


def engine_kwargs(
    model_path: str | os.PathLike,
    *,
    max_model_len: int,
    max_num_seqs: int,
    seed: int,
    dtype: str,
    logprobs_mode: str,
    device_id: int | None,
    gpu_memory_utilization: float,
    enforce_eager: bool,
) -> dict:
    """vLLM engine arguments (EngineArgs / vllm.LLM keywords) for an RL rollout engine;
    see the Engine docstring for the choices."""
    return dict(
        model=str(model_path),
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        dtype=engine_dtype(dtype, on_cpu=current_platform.is_cpu()),
        logprobs_mode=logprobs_mode,
        device_ids=None if device_id is None else [device_id],
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        enable_prefix_caching=False,
        worker_extension_cls=WORKER_EXTENSION,
        weight_transfer_config={"backend": SHM_BACKEND},
        disable_log_stats=True,
        **_no_partial_prefill(max_model_len),
    )


def _no_partial_prefill(max_model_len: int) -> dict:
    """On CPU, never split a prompt across steps.

    vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill
    with `Generator.set_offset`, which a CPU generator does not have: the engine dies
    with "CPU Generator does not use offset" as soon as a batch of seeded prompts
    overflows the step's token budget. Without chunked prefill a prompt that does not
    fit waits for the next step whole; the budget must then hold the longest one."""
    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}


def _completion(c) -> Completion:
    token_ids = list(c.token_ids)
    logprobs = list(c.logprobs.logprobs) if c.logprobs is not None else []
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
    spans = [(s.version, s.start, s.end) for s in c.weight_versions or []]
    return Completion(token_ids, logprobs, c.text, c.finish_reason, spans)


def _with_descendants(processes) -> list[psutil.Process]:
    # Taken while the engine is up: once EngineCore dies its children are re-parented
    # and can no longer be found from it.
    found = []
    for proc in processes:
        core = psutil.Process(proc.pid)
        found += [core, *core.children(recursive=True)]
    return found


# A SIGKILLed process is gone as soon as the kernel has torn it down, which for an engine
# worker holding GiBs took over 1 s on this 2-core machine under load. Returns at once
# when they are gone.
_KILL_WAIT_S = 5.0


def _signal_and_wait(processes: list[psutil.Process], send, deadline: float) -> list[psutil.Process]:
    # Polls running, not psutil.wait_procs: the engine's worker is EngineCore's child,
    # not ours, so once dead it stays a zombie that wait_procs counts as alive until
    # its timeout.
    alive = [p for p in processes if running(p)]
    for p in alive:
        try:
            send(p)
        except psutil.NoSuchProcess:
            pass
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if running(p)]
    return alive
