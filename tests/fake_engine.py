"""One fake engine: the `workers.engine.Engine` interface without vLLM, for tests that
need a fault at a precise point and for simulations (scripts/bench_overlap.py). Every
behaviour that matters to the code around an engine is a setting:

* timing: `step_s` (each step sleeps this long) and `duration` (a callable drawing each
  request's generation time; None: a request finishes at the next step);
* blocking points: `block_step` / `block_load` make `step()` / `load_weights()` wait,
  as vLLM does on a dead engine, until `wake_blocked()`, then raise EngineDeadError;
* failures: requests of prompts with index >= `stall_from` never finish (a slow engine;
  settable on the class while a test runs);
* completions: sample i of a group is "e" * i + "x" * (3 - i), so LetterTask's rewards
  vary and every step really trains.

Every call it gets is logged in `calls`; every engine built is in `FakeEngine.instances`
(tests patch `trainer.trainer.Engine` with this class: the `fake_engine` fixture). The
real engine's tests are tests/workers/test_engine.py and the fault tests.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from workers.engine import Completion, EngineDeadError, FinishedRequest


class FakeEngine:
    dtype = torch.float32
    instances: list[FakeEngine] = []  # every engine built since the list was reset
    stall_from = 10**9  # prompt indices from here on never finish

    def __init__(
        self,
        model_path: object = None,
        *,
        index: int = 0,
        step_s: float = 0.005,
        duration: Callable[[], float] | None = None,
        block_step: bool = False,
        block_load: bool = False,
        **engine_kwargs: object,  # the real engine's arguments, ignored
    ):
        self.index = index
        self.step_s = step_s
        self.duration = duration
        self.block_step = block_step
        self.block_load = block_load
        self.woken = threading.Event()
        self.pending: dict[str, tuple[float, list[int], int]] = {}  # id -> (done at, prompt, n)
        self.calls: list[tuple[str, int]] = []  # ("submit", prompt index), ("load", version)
        self.steps = 0
        self.closed = False
        FakeEngine.instances.append(self)

    def _block(self) -> None:
        self.woken.wait()
        raise EngineDeadError()

    def submit(self, request_id: str, prompt_token_ids: list[int], *, n: int, **sampling: object) -> None:
        self.calls.append(("submit", _prompt_index(request_id)))
        done_at = time.monotonic() + self.duration() if self.duration is not None else 0.0
        self.pending[request_id] = (done_at, list(prompt_token_ids), n)

    def step(self) -> list[FinishedRequest]:
        if self.block_step:
            self._block()
        self.steps += 1
        time.sleep(self.step_s)
        now, finished = time.monotonic(), []
        for rid, (done_at, prompt, n) in list(self.pending.items()):
            if done_at > now or _prompt_index(rid) >= self.stall_from:
                continue
            del self.pending[rid]
            comps = [Completion([7] * (i + 1), [-1.5] * (i + 1), "e" * i + "x" * (3 - i), "stop") for i in range(n)]
            finished.append(FinishedRequest(rid, prompt, comps))
        return finished

    def num_unfinished(self) -> int:
        return len(self.pending)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.pending.pop(rid, None)

    def load_weights(self, data: bytes, version: int | None = None) -> int:
        if self.block_load:
            self._block()
        self.calls.append(("load", version))
        return 0

    def is_alive(self) -> bool:
        return not self.closed

    def process_pids(self) -> list[int]:
        return []

    def wake_blocked(self) -> None:
        self.woken.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.closed = True


def _prompt_index(request_id: str) -> int:
    return int(request_id.split("-")[1])  # the worker's ids are "<engine>-<prompt index>"
