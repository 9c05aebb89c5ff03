"""The engine adapter against a real vLLM engine (tiny random model, CPU)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time

import pytest
import torch
from vllm.v1.engine.exceptions import EngineDeadError

from tests.helpers import alive
from trainer.models import load_policy
from trainer.policy import EngineWeights, weights_to_bytes
from workers.engine import Engine

pytestmark = [pytest.mark.engine, pytest.mark.timeout(240)]

PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356], [1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47]]


def run_to_completion(engine: Engine, timeout: float = 60.0):
    finished = {}
    deadline = time.monotonic() + timeout
    while engine.num_unfinished():
        assert time.monotonic() < deadline, "engine made no progress"
        finished.update((f.request_id, f) for f in engine.step())
    return finished


def generate(engine: Engine, prompt, **kwargs):
    engine.submit("r", prompt, **kwargs)
    return run_to_completion(engine)["r"]


def greedy_engine(engine: Engine, prompt, max_tokens=16):
    return generate(engine, prompt, n=1, max_tokens=max_tokens, temperature=0.0).completions[0].token_ids


@torch.no_grad()
def greedy_torch(model, prompt, max_tokens=16):
    ids = torch.tensor([prompt])
    for _ in range(max_tokens):
        next_id = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


# The kill tests build their own engines; they come first so that the shared engine
# is not yet running beside them (two cores).


class Watchdog(threading.Thread):
    """What the supervisor does: poll is_alive(), bridge the death into blocked threads."""

    def __init__(self, engine: Engine):
        super().__init__(daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.woke_at: float | None = None

    def run(self):
        while not self.stop.wait(0.05):
            if not self.engine.is_alive():
                self.woke_at = time.monotonic()
                self.engine.wake_blocked()
                return


class Caller(threading.Thread):
    """Runs `fn` until it raises; records the exception and when."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.calls = 0
        self.error: BaseException | None = None
        self.raised_at: float | None = None

    def run(self):
        try:
            while True:
                self.fn()
                self.calls += 1
        except BaseException as e:
            self.error = e
            self.raised_at = time.monotonic()


def assert_all_gone(pids):
    left = alive(pids)
    assert not left, f"engine processes left: {left}"


def test_sigkill_mid_generation_unblocks_step(tiny_model_path):
    engine = Engine(tiny_model_path, max_model_len=512)
    pids = engine.process_pids()
    try:
        for i in range(4):
            engine.submit(f"g{i}", PROMPTS[0], n=4, max_tokens=400, seed=i)
        stepper = Caller(engine.step)
        watchdog = Watchdog(engine)
        stepper.start()
        watchdog.start()
        while stepper.calls < 5:
            assert stepper.is_alive(), stepper.error
            time.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        stepper.join(10)
        assert not stepper.is_alive(), "step() still blocked 10 s after EngineCore was killed"
        assert isinstance(stepper.error, EngineDeadError), repr(stepper.error)
        assert stepper.raised_at - killed_at < 2.0
        # vLLM sometimes raises by itself before the watchdog looks: woke_at stays None.
        seen = "never (vLLM raised first)" if watchdog.woke_at is None else f"{watchdog.woke_at - killed_at:.3f} s"
        print(f"SIGKILL -> step() raised: {stepper.raised_at - killed_at:.3f} s (watchdog saw death after {seen})")
        assert not engine.is_alive()
        watchdog.stop.set()
        again = Caller(engine.step)  # a second call must not block either
        again.start()
        again.join(2)
        assert isinstance(again.error, EngineDeadError), repr(again.error)
    finally:
        engine.shutdown()
    assert_all_gone(pids)


def test_sigkill_during_load_weights_unblocks_it(tiny_model_path):
    engine = Engine(tiny_model_path, max_model_len=512)
    pids = engine.process_pids()
    model, _ = load_policy(tiny_model_path, "cpu", engine.dtype)
    shared = EngineWeights(engine.dtype)
    handle = shared.write(model)
    try:
        # Stopped first, so that the call is certainly waiting for its answer when the
        # kill lands (a weight load on the tiny model takes well under a second).
        os.kill(pids[0], signal.SIGSTOP)
        loader = Caller(lambda: engine.load_weights(handle))
        watchdog = Watchdog(engine)
        loader.start()
        time.sleep(0.5)
        assert loader.is_alive() and loader.calls == 0
        watchdog.start()
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        loader.join(10)
        assert not loader.is_alive(), "load_weights() still blocked 10 s after EngineCore was killed"
        assert isinstance(loader.error, EngineDeadError), repr(loader.error)
        assert loader.raised_at - killed_at < 2.0
        print(f"SIGKILL -> load_weights() raised: {loader.raised_at - killed_at:.3f} s")
        watchdog.stop.set()
    finally:
        engine.shutdown()
        shared.close()
    assert_all_gone(pids)
    assert not os.path.exists(handle.path)


def test_shutdown_is_idempotent_and_wakes_a_blocked_step(tiny_model_path):
    engine = Engine(tiny_model_path, max_model_len=512)
    pids = engine.process_pids()
    engine.submit("g", PROMPTS[0], n=2, max_tokens=400, seed=0)
    os.kill(pids[0], signal.SIGSTOP)  # alive but stuck: the hang case
    stepper = Caller(engine.step)
    stepper.start()
    time.sleep(0.3)
    assert engine.is_alive()
    started = time.monotonic()
    engine.shutdown(timeout=5)
    assert time.monotonic() - started < 7
    stepper.join(5)
    assert isinstance(stepper.error, EngineDeadError), repr(stepper.error)
    assert not engine.is_alive()
    engine.shutdown()
    assert_all_gone(pids)


def test_the_engines_files_outside_dev_shm_are_in_its_scratch_dir(tiny_engine):
    """vLLM's sockets and its executor's FileStore: in the directory that the engine's
    shutdown (or the launcher's sweep) removes; torch's compile cache is not there, so
    it stays shared between runs."""
    scratch = tiny_engine._scratch
    names = {p.name for p in scratch.iterdir()}
    assert any(n.startswith("vllm_dist_") for n in names), names
    assert any(stat.S_ISSOCK((scratch / n).lstat().st_mode) for n in names), names
    assert not any("torchinductor" in n for n in names), names


def test_group_of_samples_with_logprobs(tiny_engine):
    group = generate(tiny_engine, PROMPTS[0], n=4, max_tokens=12, seed=7)
    assert group.request_id == "r"
    assert group.prompt_token_ids == PROMPTS[0]
    assert len(group.completions) == 4
    for c in group.completions:
        assert 0 < len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.weight_versions and c.weight_versions[0][1] == 0
    assert len({tuple(c.token_ids) for c in group.completions}) > 1, "the group's samples are all the same"


def test_same_seed_same_samples_other_seed_differs(tiny_engine):
    def samples(seed):
        group = generate(tiny_engine, PROMPTS[1], n=4, max_tokens=12, seed=seed)
        return [(c.token_ids, c.logprobs) for c in group.completions]

    assert samples(11) == samples(11)
    assert [t for t, _ in samples(11)] != [t for t, _ in samples(12)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_torch(tiny_engine, tiny_model_path, temperature):
    model, _ = load_policy(tiny_model_path, "cpu", torch.float32)
    group = generate(tiny_engine, PROMPTS[0], n=2, max_tokens=10, seed=3, temperature=temperature)
    for c in group.completions:
        ids = torch.tensor([PROMPTS[0] + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(PROMPTS[0]) - 1 : -1] / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-3, rtol=0)


def test_step_without_requests_returns_at_once(tiny_engine):
    started = time.monotonic()
    assert tiny_engine.step() == []
    assert time.monotonic() - started < 0.1


def test_prompt_too_long_is_refused_at_submit(tiny_engine):
    with pytest.raises(ValueError, match="maximum context length"):
        tiny_engine.submit("long", [1] * 600, n=2, max_tokens=4)
    assert tiny_engine.num_unfinished() == 0
    assert tiny_engine.step() == []


def test_abort(tiny_engine):
    tiny_engine.submit("a", PROMPTS[0], n=2, max_tokens=400, seed=0)
    tiny_engine.submit("b", PROMPTS[1], n=2, max_tokens=3, seed=0)
    with pytest.raises(ValueError, match="already in flight"):
        tiny_engine.submit("b", PROMPTS[1], n=2, max_tokens=3)
    tiny_engine.step()
    tiny_engine.abort(["a"])
    assert tiny_engine.num_unfinished() == 1
    assert list(run_to_completion(tiny_engine)) == ["b"]
    assert tiny_engine.step() == []


def test_weight_sync_matches_torch(tiny_engine, tiny_model_path):
    """Both ways in: the shared-memory file (the default) and safetensors bytes."""
    model, _ = load_policy(tiny_model_path, "cpu", torch.float32)
    before = [greedy_engine(tiny_engine, p) for p in PROMPTS]
    assert before == [greedy_torch(model, p) for p in PROMPTS]
    original = weights_to_bytes(model, tiny_engine.dtype)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    shared = EngineWeights(tiny_engine.dtype)
    try:
        started = time.monotonic()
        count = tiny_engine.load_weights(shared.write(model), version=1)
        print(f"weight sync (tiny, {len(original) / 2**20:.0f} MiB, shared memory): {time.monotonic() - started:.3f} s")
        assert count == len(list(model.named_parameters()))
        assert set(tiny_engine.last_load_s) == {"init", "start", "update", "finish", "rpc"}
        shared.mapped()  # the engine holds its own mapping: the name can go
        after = [greedy_engine(tiny_engine, p) for p in PROMPTS]
        assert after == [greedy_torch(model, p) for p in PROMPTS]
        assert after != before
        group = generate(tiny_engine, PROMPTS[0], n=1, max_tokens=4, seed=0)
        sample = group.completions[0]
        assert sample.weight_versions == [("1", 0, len(sample.token_ids))]
        # The engine copied the weights: what the trainer writes next does not reach
        # it before the next sync.
        shared.shared.buffer[4096:] = bytes(len(shared.shared.buffer) - 4096)
        assert [greedy_engine(tiny_engine, p) for p in PROMPTS] == after
        # The next sync reuses the mapping (no init).
        assert tiny_engine.load_weights(shared.write(model), version=2) == count
        assert "init" not in tiny_engine.last_load_s
        assert [greedy_engine(tiny_engine, p) for p in PROMPTS] == after
    finally:
        shared.close()
        assert tiny_engine.load_weights(original, version=0) == count  # as bytes
        assert set(tiny_engine.last_load_s) == {"bytes"}
    assert [greedy_engine(tiny_engine, p) for p in PROMPTS] == before


def test_seeded_prompts_beyond_one_step_budget(tiny_engine):
    """More seeded prompt tokens than one step's budget (2048) used to kill the CPU
    engine: vLLM rewinds a seeded generator after a partial prefill, which CPU
    generators cannot do ("CPU Generator does not use offset")."""
    prompt = (PROMPTS[0] * 30)[:200]
    for i in range(12):  # 12 groups x 4 samples x 200 prompt tokens = 9600 tokens
        tiny_engine.submit(f"p{i}", prompt, n=4, max_tokens=4, seed=i)
    finished = run_to_completion(tiny_engine)
    assert sorted(finished) == sorted(f"p{i}" for i in range(12))
    assert all(len(c.token_ids) == 4 for f in finished.values() for c in f.completions)
