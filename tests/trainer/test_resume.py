"""Resume and graceful stop of the real Trainer, in process, with a fake engine in place
of vLLM (seconds, not minutes): which prompts each step trains across a resume, the
restored optimizer, the resumed weights reaching the engines before they generate, and
what SIGINT/SIGTERM do. tests/test_resume_engine.py repeats the key cases end to end."""

import os
import pathlib
import signal
import threading
import time

import pytest
import torch
from structlog.testing import capture_logs

import trainer.trainer as trainer_mod
from tests.fake_engine import FakeEngine
from tests.helpers import LetterTask, run_threads
from trainer import TrainerConfig
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError, RunInterrupted
from trainer.prompts import PromptCursor, TrainedPrompts
from trainer.trainer import Trainer


# ---- the prompt record ---------------------------------------------------------------


def test_trained_prompts_keep_a_low_water_mark_and_the_sparse_set_above_it():
    t = TrainedPrompts()
    t.add([1, 3])
    assert (t.low_water, t.above) == (0, {1, 3})
    t.add([0])
    assert (t.low_water, t.above) == (2, {3})
    t.add([2, 5])
    assert t.state() == {"low_water": 4, "above": [5]}
    assert 3 in t and 5 in t and 4 not in t
    with pytest.raises(RuntimeError, match="prompt 5 trained on twice"):
        t.add([5])
    with pytest.raises(RuntimeError, match="prompt 1 trained on twice"):
        t.add([1])
    again = TrainedPrompts.from_state(t.state())
    assert (again.low_water, again.above) == (4, {5})


class _Tokenizer:
    chat_template = None

    def apply_chat_template(self, messages, **kwargs):
        return [1, 2]

    def __call__(self, text, **kwargs):
        return {"input_ids": [1, 2]}


def test_a_resumed_cursor_hands_out_every_untrained_prompt_once_in_order():
    trained = TrainedPrompts.from_state({"low_water": 4, "above": [5, 7, 8]})
    cursor = PromptCursor(LetterTask(), _Tokenizer(), start=trained.low_water, skip=trained.above)
    assert [cursor.next().index for _ in range(4)] == [4, 6, 9, 10]


# ---- a fake engine in the real Trainer ----------------------------------------------------


def config(run_dir, tiny_model_path, *overrides):
    return TrainerConfig.load(
        None,
        [
            f"model.path={tiny_model_path}", f"run.output_dir={run_dir}", "algo.group_size=2",
            "algo.groups_per_step=2", "algo.max_staleness=0", "algo.lr=1e-2", "gen.max_tokens=8",
            "run.checkpoint_every=1", "run.keep_checkpoints=2", *overrides,
        ],
    )


def fit_recording(trainer):
    """trainer.fit(); returns {step: sorted prompt indices trained at that step}."""
    per_step = {}
    train_on = trainer._train_on

    def recording(groups):
        per_step[trainer.step] = sorted(g.prompt_index for g in groups)
        return train_on(groups)

    trainer._train_on = recording
    try:
        trainer.fit()
    finally:
        trainer._train_on = train_on
    return per_step


def test_resume_trains_the_same_prompts_per_step_and_ends_with_the_same_weights(
    tmp_path, tiny_model_path, fake_engine, monkeypatch
):
    ref = Trainer(config(tmp_path / "ref", tiny_model_path, "run.steps=3"), task=LetterTask())
    ref_steps = fit_recording(ref)
    assert ref_steps == {k: [2 * k, 2 * k + 1] for k in range(3)}

    run = tmp_path / "run"
    first = fit_recording(Trainer(config(run, tiny_model_path, "run.steps=2"), task=LetterTask()))
    # Killed after step 2 was trained but before its checkpoint was complete:
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 2]
    (run / "checkpoints" / "step-00000002").rename(run / "checkpoints" / ".tmp-step-00000002-killed")

    FakeEngine.instances = []
    summed, real_crc32 = [], ckpt._crc32
    monkeypatch.setitem(ckpt._CHECKSUMS, "crc32", lambda p: (summed.append(p), real_crc32(p))[1])
    resumed = Trainer(config(run, tiny_model_path, "run.steps=3"), task=LetterTask())
    with capture_logs() as logs:
        second = fit_recording(resumed)
    # Its files were read once for their checksums, when it was chosen; not again to load.
    step_1 = run / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in summed if p.parent == step_1) == sorted(ckpt.FILES)
    (event,) = [e for e in logs if e["event"] == "resumed"]
    assert event["checkpoint_step"] == 1 and event["policy_version"] == 1
    assert {**{k: v for k, v in first.items() if k < 1}, **second} == ref_steps
    assert sorted(second) == [1, 2]
    assert [h["policy_version"] for h in resumed.history] == [2, 3]
    # The engine got the resumed weights (version 1) before it generated anything.
    (engine,) = FakeEngine.instances
    assert engine.calls[0] == ("load", 1) and engine.calls[1][0] == "submit"
    # Optimizer state, RNG and weights were restored: training went on exactly as if
    # never interrupted.
    for (name, a), (_, b) in zip(ref.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [trainer_mod.json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_async_resume_trains_no_prompt_twice_and_regenerates_those_in_flight(tmp_path, tiny_model_path, fake_engine):
    """Two engines, staleness 1: prompts are trained out of order; the checkpoint's
    record makes the resumed run skip exactly the trained ones."""
    run = tmp_path / "run"
    overrides = ("engine.count=2", "algo.max_staleness=1", "run.keep_checkpoints=5")
    first = fit_recording(Trainer(config(run, tiny_model_path, "run.steps=3", *overrides), task=LetterTask()))
    state = trainer_mod.json.loads((run / "checkpoints" / "step-00000003" / ckpt.TRAINER_STATE).read_text())
    trained_first = [i for s in sorted(first) for i in first[s]]
    assert sorted(trained_first) == sorted(set(trained_first))
    record = TrainedPrompts.from_state(state["prompts"])
    assert set(trained_first) == set(range(record.low_water)) | record.above

    FakeEngine.instances = []
    second = fit_recording(Trainer(config(run, tiny_model_path, "run.steps=6", *overrides), task=LetterTask()))
    trained_second = [i for s in sorted(second) for i in second[s]]
    assert not set(trained_first) & set(trained_second)
    # Every prompt below the highest one trained was trained exactly once.
    everything = trained_first + trained_second
    assert sorted(everything) == sorted(set(everything))
    handed_out = sorted(i for e in FakeEngine.instances for kind, i in e.calls if kind == "submit")
    assert handed_out[0] == record.low_water  # regenerated: in flight when the first run ended
    assert not set(handed_out) & set(trained_first)


def send_when(condition, sig, times=1, gap_s=0.05):
    """From a helper thread: once condition() holds, send `sig` to this process."""

    def run():
        deadline = time.monotonic() + 60
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        for _ in range(times):
            os.kill(os.getpid(), sig)
            time.sleep(gap_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_finishes_the_step_checkpoints_stops_and_fit_resumes(tmp_path, tiny_model_path, fake_engine):
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=4", "run.checkpoint_every=3"), task=LetterTask())
    in_step_1 = threading.Event()
    train_on = trainer._train_on

    def slow_step(groups):
        if trainer.step == 1:
            in_step_1.set()
            time.sleep(0.3)  # the signal lands mid-step
        return train_on(groups)

    trainer._train_on = slow_step
    sender = send_when(in_step_1.is_set, signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        trainer.fit()
    sender.join(5)
    e = info.value
    assert e.graceful and e.signum == signal.SIGTERM and e.exit_code == 143
    assert e.step == trainer.step == 2  # the step in flight was finished
    assert e.checkpoint == str(tmp_path / "checkpoints" / "step-00000002")
    ckpt.verify_checkpoint(e.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is before
    assert run_threads() == [] and all(engine.closed for engine in FakeEngine.instances)
    c = trainer.queue.assert_drained()
    assert c.consumed == c.retired == 4

    trainer._train_on = train_on
    history = trainer.fit()  # the same object, as in a notebook: continues from step 2
    assert [h["step"] for h in history] == [2, 3]
    assert trainer.resumed_from == pathlib.Path(e.checkpoint)


def test_sigint_while_waiting_for_rollouts_abandons_the_step(tmp_path, tiny_model_path, fake_engine):
    FakeEngine.stall_from = 2  # step 1 waits forever for prompts 2 and 3
    try:
        trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=6"), task=LetterTask())
        waiting = threading.Event()
        check_waiting = trainer._check_waiting

        def check_while_waiting():  # called every 0.1 s while get_batch waits
            if trainer.step == 1:
                waiting.set()
            check_waiting()

        trainer._check_waiting = check_while_waiting
        sender = send_when(waiting.is_set, signal.SIGINT)
        t0 = time.monotonic()
        with capture_logs() as logs, pytest.raises(RunInterrupted) as info:
            trainer.fit()
        sender.join(5)
    finally:
        FakeEngine.stall_from = 10**9
    assert time.monotonic() - t0 < 30
    e = info.value
    assert e.graceful and e.exit_code == 130 and e.step == 1
    assert e.checkpoint == str(tmp_path / "checkpoints" / "step-00000001")  # saved before the wait: not again
    assert [x["checkpoint_step"] for x in logs if x["event"] == "checkpoint_saved"] == [1]
    assert any(x["event"] == "stopping" and "abandoned" in x["reason"] for x in logs)
    c = trainer.queue.assert_drained()  # nothing consumed from the abandoned step
    assert c.consumed == c.retired == 2
    assert run_threads() == []


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, tiny_model_path, fake_engine, monkeypatch):
    real = trainer_mod.token_logprobs
    started = threading.Event()

    def slow_logprobs(*args, **kwargs):
        started.set()
        # The step cannot end before both signals are in, however late the sender runs
        # on a loaded machine (a fixed sleep here once lost that race in CI).
        deadline = time.monotonic() + 3
        while trainer._stop_count < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "token_logprobs", slow_logprobs)
    # 4 micro-batches of one sequence: the second signal arrives in the first.
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=3", "algo.micro_batch_size=1"), task=LetterTask())
    sender = send_when(started.is_set, signal.SIGTERM, times=2)
    t0 = time.monotonic()
    with capture_logs() as logs, pytest.raises(RunInterrupted) as info:
        trainer.fit()
    sender.join(5)
    assert time.monotonic() - t0 < 5
    e = info.value
    assert not e.graceful and e.checkpoint is None and e.step == 0 and e.exit_code == 143
    assert not any(x["event"] == "checkpoint_saved" for x in logs)
    assert ckpt.list_checkpoints(tmp_path) == []
    assert any(x["event"] == "stop_now" for x in logs)
    assert run_threads() == [] and all(engine.closed for engine in FakeEngine.instances)


def test_outside_the_main_thread_no_handler_is_installed_and_request_stop_works(tmp_path, tiny_model_path, fake_engine):
    trainer = Trainer(config(tmp_path, tiny_model_path, "run.steps=50", "run.checkpoint_every=100"), task=LetterTask())
    before = signal.getsignal(signal.SIGINT)
    seen, result = [], {}

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=fit)
    t.start()
    while trainer.step < 1 and t.is_alive():
        seen.append(signal.getsignal(signal.SIGINT))
        time.sleep(0.01)
    trainer.request_stop()
    t.join(30)
    assert all(h is before for h in seen)
    e = result["error"]
    assert isinstance(e, RunInterrupted) and e.graceful and 1 <= e.step < 50
    assert e.checkpoint == str(tmp_path / "checkpoints" / f"step-{e.step:08d}")
    assert run_threads() == []


def test_resume_never_refuses_a_directory_with_checkpoints_and_a_bad_path_is_a_config_error(
    tmp_path, tiny_model_path, fake_engine
):
    Trainer(config(tmp_path, tiny_model_path, "run.steps=1"), task=LetterTask()).fit()
    with pytest.raises(ConfigError, match="run.resume=never") as info:
        Trainer(config(tmp_path, tiny_model_path, "run.steps=2", "run.resume=never"), task=LetterTask()).fit()
    assert info.value.key == "run.resume"
    bad = tmp_path / "checkpoints" / "step-00000001"
    (bad / ckpt.MODEL).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="model.safetensors has 7 bytes") as info:
        Trainer(config(tmp_path / "other", tiny_model_path, f"run.resume={bad}"), task=LetterTask()).fit()
    assert info.value.key == "run.resume"
    assert not FakeEngine.instances[1:]  # neither started an engine


def test_a_finished_run_resumed_again_does_nothing(tmp_path, tiny_model_path, fake_engine, monkeypatch):
    warm_ups = []
    warm_up = trainer_mod.warm_up_optimizer
    monkeypatch.setattr(trainer_mod, "warm_up_optimizer", lambda opt: (warm_ups.append(opt), warm_up(opt)))
    Trainer(config(tmp_path, tiny_model_path, "run.steps=1"), task=LetterTask()).fit()
    assert len(warm_ups) == 1  # a run that trains allocates its optimizer state up front
    FakeEngine.instances = []
    again = Trainer(config(tmp_path, tiny_model_path, "run.steps=1"), task=LetterTask())
    with capture_logs() as logs:
        history = again.fit()
    assert history == [] and FakeEngine.instances == []
    assert any(e["event"] == "run_already_complete" for e in logs)
    # No step follows: neither the optimizer warm-up nor any optimizer state.
    assert len(warm_ups) == 1 and len(again.optimizer.state) == 0
