"""Experiment tracking (trainer/tracking.py): each real tracker's data read back with its
own reader, and the queue/thread that keeps a failing or slow tracker off the training.

Nothing here touches $HOME or the network: HOME, the wandb directories, the netrc file,
the Hugging Face token and trackio's store all point into tmp_path, and wandb runs
offline."""

import importlib.util
import json
import pathlib
import struct
import sys
import threading
import time

import pytest
import structlog

from trainer.config import TrainerConfig
from trainer.errors import ConfigError
from trainer.tracking import TRACKING_FILE, WANDB_STEP_METRIC, Trackers, check_trackers, numbers_of

RECORDS = [  # what the trainer logs: numbers, a None (a step that trained no token), a string
    {"step": 0, "reward/mean": 0.25, "loss/policy": None, "note": "warmup", "loss/nonfinite_skipped": False},
    {"step": 1, "reward/mean": 0.5, "loss/policy": -0.125, "note": "x", "loss/nonfinite_skipped": True},
    {"step": 2, "reward/mean": 0.75, "loss/policy": 0.0625, "note": "y", "loss/nonfinite_skipped": False},
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every tracker's files and credentials inside tmp_path; wandb offline and quiet."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # none there: no `wandb login` credentials
    # Set here, so that tracking.py's os.environ.setdefault changes nothing that outlives the test.
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "HF_TOKEN",
                 "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "hf-token"))  # trackio: no whoami


@pytest.fixture
def events():
    """Every structlog event, with the context variables merged in (as our chain does)."""
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    yield capture.entries
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def config(tmp_path, *overrides):
    return TrainerConfig.load(None, [f"run.output_dir={tmp_path / 'run'}", *overrides])


def run_dir(cfg):
    return pathlib.Path(cfg.run.output_dir)


def log_all(trackers, records, offset=0.0):
    for r in records:
        trackers.log({k: v + offset if isinstance(v, float) else v for k, v in r.items()}, step=r["step"])


def named(events, event):
    return [e for e in events if e["event"] == event]


# ---- config ---------------------------------------------------------------------------


def test_log_config_defaults_and_dotted_override(tmp_path):
    cfg = TrainerConfig.load()
    assert (cfg.log.trackers, cfg.log.project, cfg.log.run_name) == ([], "rl-trainer", None)
    cfg = config(tmp_path, "log.trackers=[tensorboard,wandb]", "log.project=p1", "log.run_name=2024")
    assert cfg.log.trackers == ["tensorboard", "wandb"]
    assert (cfg.log.project, cfg.log.run_name) == ("p1", "2024")  # a name stays a string
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainerConfig().log.trackers is not TrainerConfig().log.trackers


@pytest.mark.parametrize(
    "override, message",
    [
        ("log.trackers=[wandb,wandb]", "must not name a tracker twice"),
        ("log.trackers=[mlflow]", "expected a list of one of 'tensorboard', 'wandb', 'trackio'"),
        ("log.trackers=wandb", "expected a list of"),
    ],
)
def test_bad_trackers_are_config_errors_on_log_trackers(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as e:
        config(tmp_path, override)
    assert e.value.key == "log.trackers"


def test_empty_project_or_run_name_is_a_config_error(tmp_path):
    for override, key in (("log.project=' '", "log.project"), ("log.run_name=''", "log.run_name")):
        with pytest.raises(ConfigError) as e:
            config(tmp_path, override)
        assert e.value.key == key


# ---- missing packages -----------------------------------------------------------------


def test_check_trackers_names_the_tracker_and_package_to_install(tmp_path, monkeypatch):
    cfg = config(tmp_path, "log.trackers=[tensorboard,wandb,trackio]")
    check_trackers(cfg.log)  # all installed here: no error
    real = importlib.util.find_spec
    asked = []

    def find_spec(name, *args):
        asked.append(name)
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as e:
        check_trackers(cfg.log)
    assert e.value.key == "log.trackers"
    assert "'wandb'" in str(e.value) and "pip install wandb" in str(e.value)
    assert asked == ["tensorboard", "wandb"]
    check_trackers(config(tmp_path, "log.trackers=[tensorboard]").log)  # the others are not needed


def test_check_trackers_imports_nothing(tmp_path, monkeypatch):
    for name in ("wandb", "trackio"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    check_trackers(config(tmp_path, "log.trackers=[wandb,trackio]").log)
    assert "wandb" not in sys.modules and "trackio" not in sys.modules


# ---- what a tracker gets --------------------------------------------------------------


def test_numbers_of_keeps_finite_numbers_bools_as_ints_and_drops_the_step():
    import numpy as np

    got = numbers_of({"step": 3, "a": 1, "b": 0.5, "c": None, "d": "text", "e": True, "f": float("nan"),
                      "g": float("inf"), "h": np.float32(0.25), "i": 10**400, "j": [1]})
    assert got == {"a": 1, "b": 0.5, "e": 1, "h": 0.25}
    assert type(got["e"]) is int and type(got["h"]) is float


# ---- tensorboard ----------------------------------------------------------------------


def tensorboard_events(cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(cfg) / "tensorboard"))
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_hparams_and_config_text(tmp_path, capfd, events):
    from tensorboard.plugins.hparams import metadata

    cfg = config(tmp_path, "log.trackers=[tensorboard]", "algo.lr=2e-5")
    trackers = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="run-tb")
    log_all(trackers, RECORDS)
    trackers.close(timeout_s=30)

    acc = tensorboard_events(cfg)
    assert scalars(acc, "reward/mean") == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert scalars(acc, "loss/policy") == [(1, -0.125), (2, 0.0625)]  # the None left out
    assert scalars(acc, "loss/nonfinite_skipped") == [(0, 0), (1, 1), (2, 0)]
    assert set(acc.Tags()["scalars"]) == {"reward/mean", "loss/policy", "loss/nonfinite_skipped"}  # no step, no note

    # The HParams tab's data, as its plugin reads it: in this run's own directory.
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.group_name == "run-tb"
    assert start.hparams["algo.lr"].number_value == pytest.approx(2e-5)
    assert start.hparams["algo.group_size"].number_value == 8
    assert start.hparams["task.name"].string_value == "arithmetic"
    assert start.hparams["log.trackers"].string_value == '["tensorboard"]'
    assert start.hparams["algo.filter_zero_std"].bool_value is True
    (text,) = acc.Tensors("config/text_summary")
    assert "group_size: 8" in text.tensor_proto.string_val[0].decode()

    assert [e["log_dir"] for e in named(events, "tracker_started")] == [str(run_dir(cfg) / "tensorboard")]
    assert not named(events, "tracker_failed")
    assert capfd.readouterr().out == ""  # stdout carries the JSON lines alone


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    cfg = config(tmp_path, "log.trackers=[tensorboard]")
    first = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="a")
    log_all(first, RECORDS)  # steps 0, 1, 2
    first.close(timeout_s=30)
    # Resumed from the checkpoint after step 0: steps 1 and 2 are trained again.
    second = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="b", start_step=1, resumed=True)
    log_all(second, RECORDS[1:] + [{**RECORDS[2], "step": 3}], offset=10.0)
    second.close(timeout_s=30)

    assert len(list((run_dir(cfg) / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert scalars(tensorboard_events(cfg), "reward/mean") == [(0, 0.25), (1, 10.5), (2, 10.75), (3, 10.75)]

    # A fresh start in the same directory (step 0, not resumed) hides the earlier run.
    fresh = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="c")
    log_all(fresh, RECORDS[:1], offset=100.0)
    fresh.close(timeout_s=30)
    assert scalars(tensorboard_events(cfg), "reward/mean") == [(0, 100.25)]


# ---- wandb ----------------------------------------------------------------------------


def wandb_records(path):
    """The records of a .wandb transaction log, parsed with wandb's own protobuf schema.
    The file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's log
    format: 32 KiB blocks of chunks, each a 7-byte header (crc32c, length, type:
    1 full, 2 first, 3 middle, 4 last) and data."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding
            pos += left_in_block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir_, run_id, wait_s=15.0):
    """(run record, config, history rows, metric records, finished) of each offline run
    with that id, oldest first. wandb-core may still be writing a segment's file after
    finish() returned (seen on a loaded machine): read again until each holds its run
    record, for at most wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _wandb_run(run_dir_, run_id)
        except _Incomplete:
            if time.monotonic() > deadline:
                raise AssertionError(f"an offline wandb run of {run_id} has no run record after {wait_s}s") from None
            time.sleep(0.2)


class _Incomplete(Exception):
    pass


def _wandb_run(run_dir_, run_id):
    runs = []
    # A second segment started in the same second as the first is "...-{run_id}-1".
    for path in sorted(run_dir_.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")):
        run, history, metrics, finished = None, [], [], False
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "metric":
                metrics.append(r.metric)
            elif kind == "exit":
                finished = True
        if run is None:
            raise _Incomplete(path)
        cfg = {i.key: json.loads(i.value_json) for i in run.config.update}
        runs.append((run, cfg, history, metrics, finished))
    return runs


def wandb_id(cfg):
    return json.loads((run_dir(cfg) / TRACKING_FILE).read_text())["wandb_run_id"]


def test_wandb_offline_run_read_back(tmp_path, capfd, events):
    cfg = config(tmp_path, "log.trackers=[wandb]", "log.project=proj-w", "algo.group_size=6")
    trackers = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="x")
    log_all(trackers, RECORDS)
    trackers.close(timeout_s=60)
    assert not named(events, "tracker_failed")

    run_id = wandb_id(cfg)
    ((run, run_config, history, metrics, finished),) = wandb_run(run_dir(cfg), run_id)
    assert (run.run_id, run.project, run.display_name) == (run_id, "proj-w", "run")  # name: the output dir's
    assert run_config["algo"]["group_size"] == 6 and run_config["log"]["trackers"] == ["wandb"]
    assert [(h[WANDB_STEP_METRIC], h["reward/mean"]) for h in history] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [h.get("loss/policy") for h in history] == [None, -0.125, 0.0625]  # the None not logged
    assert [h["loss/nonfinite_skipped"] for h in history] == [0, 1, 0]
    assert not any("note" in h or "step" in h for h in history)
    # Every chart's x-axis is the trainer's step.
    assert any(m.glob_name == "*" and m.step_metric == WANDB_STEP_METRIC for m in metrics)
    assert finished
    (started,) = named(events, "tracker_started")
    assert (started["mode"], started["wandb_run_id"]) == ("offline", run_id)
    assert capfd.readouterr().out == ""


def test_wandb_resume_continues_the_run_and_a_fresh_start_does_not(tmp_path):
    cfg = config(tmp_path, "log.trackers=[wandb]")
    first = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="a")
    log_all(first, RECORDS)
    first.close(timeout_s=60)
    run_id = wandb_id(cfg)

    # Resumed after step 1: step 2 again (wandb would drop a step lower than one it has
    # seen; ours is the metric trainer/step, so nothing is dropped), then step 3.
    second = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="b", start_step=2, resumed=True)
    log_all(second, [RECORDS[2], {**RECORDS[2], "step": 3}], offset=10.0)
    second.close(timeout_s=60)
    assert wandb_id(cfg) == run_id
    runs = wandb_run(run_dir(cfg), run_id)
    assert len(runs) == 2  # two offline segments of one run: `wandb sync` uploads them in order
    run, _, history, _, finished = runs[1]
    assert run.run_id == run_id and finished
    assert [(h[WANDB_STEP_METRIC], h["reward/mean"]) for h in history] == [(2, 10.75), (3, 10.75)]
    assert [h["_step"] for h in history] == [0, 1]  # wandb's own step: this segment's log calls

    fresh = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="c", resumed=False)
    log_all(fresh, RECORDS[:1])
    fresh.close(timeout_s=60)
    assert wandb_id(cfg) != run_id
    assert len(wandb_run(run_dir(cfg), wandb_id(cfg))) == 1


def test_wandb_mode_set_by_the_user_wins(tmp_path, monkeypatch, events):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = config(tmp_path, "log.trackers=[wandb]")
    trackers = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="x")
    log_all(trackers, RECORDS)
    trackers.close(timeout_s=60)
    assert [e["mode"] for e in named(events, "tracker_started")] == ["disabled"]
    assert not named(events, "tracker_failed")
    assert not list(run_dir(cfg).glob("wandb/offline-run-*"))


def test_wandb_online_when_credentials_are_set(tmp_path, monkeypatch):
    from trainer.tracking import _wandb_has_credentials

    assert not _wandb_has_credentials()
    netrc = pathlib.Path(tmp_path / "home" / ".netrc")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    assert _wandb_has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # another host: not its key
    assert not _wandb_has_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert _wandb_has_credentials()


# ---- trackio --------------------------------------------------------------------------


@pytest.fixture
def trackio_store(tmp_path, monkeypatch):
    """trackio's store in tmp_path. trackio reads TRACKIO_DIR once, at import, and its
    modules copy the path: each copy is pointed at this test's store."""
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    import trackio  # noqa: F401

    for name, module in list(sys.modules.items()):
        if module is not None and (name == "trackio" or name.startswith("trackio.")):
            for attr, path in (("TRACKIO_DIR", store), ("MEDIA_DIR", store / "media"),
                               ("ARTIFACTS_DIR", store / "artifacts")):
                if isinstance(getattr(module, attr, None), pathlib.Path):
                    monkeypatch.setattr(module, attr, path)
    return store


def test_trackio_logs_read_back_from_its_store(tmp_path, trackio_store, capfd, events):
    from trackio.sqlite_storage import SQLiteStorage

    cfg = config(tmp_path, "log.trackers=[trackio]", "log.project=proj-t", "log.run_name=r1", "algo.group_size=6")
    trackers = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="x")
    log_all(trackers, RECORDS)
    trackers.close(timeout_s=60)
    assert not named(events, "tracker_failed")

    assert SQLiteStorage.get_runs("proj-t") == ["r1"]
    logs = SQLiteStorage.get_logs("proj-t", "r1")
    assert [(row["step"], row["reward/mean"]) for row in logs] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [row.get("loss/policy") for row in logs] == [None, -0.125, 0.0625]
    assert [row["loss/nonfinite_skipped"] for row in logs] == [0, 1, 0]
    assert not any("note" in row for row in logs)
    run_config = SQLiteStorage.get_run_config("proj-t", "r1")
    assert run_config["algo"]["group_size"] == 6
    assert (trackio_store / "proj-t.db").exists()
    assert [e["store"] for e in named(events, "tracker_started")] == [str(trackio_store)]
    assert capfd.readouterr().out == ""  # trackio's print()s went to debug events instead
    assert any("Trackio" in e["text"] for e in named(events, "tracker_output"))

    # Resumed: the same run goes on.
    resumed = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="y", start_step=3, resumed=True)
    log_all(resumed, [{**RECORDS[0], "step": 3}])
    resumed.close(timeout_s=60)
    assert len(SQLiteStorage.get_run_records("proj-t")) == 1
    assert [row["step"] for row in SQLiteStorage.get_logs("proj-t", "r1")] == [0, 1, 2, 3]


# ---- the queue and its thread ---------------------------------------------------------


class FakeTracker:
    def __init__(self, name, fail_in=None, log_wait_s=0.0, init_gate=None):
        self.name = name
        self.fail_in = fail_in
        self.log_wait_s = log_wait_s
        self.init_gate = init_gate
        self.release = threading.Event()  # ends a slow log early, at the test's end
        self.calls = []
        self.threads = set()

    def init(self):
        self.threads.add(threading.current_thread().name)
        self.calls.append(("init",))
        if self.init_gate is not None:
            self.init_gate.wait(10)
        if self.fail_in == "init":
            raise RuntimeError("no server")

    def log(self, metrics, step):
        self.threads.add(threading.current_thread().name)
        self.calls.append(("log", step, metrics))
        if self.log_wait_s:
            self.release.wait(self.log_wait_s)
        if self.fail_in == "log":
            raise ValueError("bad value")

    def finish(self):
        self.calls.append(("finish",))


def test_a_failing_tracker_is_reported_once_and_the_others_get_every_record(events):
    structlog.contextvars.bind_contextvars(run_id="run-ctx")
    good, bad_log, bad_init = FakeTracker("good"), FakeTracker("bad_log", "log"), FakeTracker("bad_init", "init")
    trackers = Trackers([good, bad_log, bad_init])
    for step in range(5):
        trackers.log({"step": step, "reward/mean": step / 10, "note": "n"}, step=step)
    trackers.close(timeout_s=10)

    assert good.calls == [("init",)] + [("log", s, {"reward/mean": s / 10}) for s in range(5)] + [("finish",)]
    assert bad_log.calls == [("init",), ("log", 0, {"reward/mean": 0.0})]  # not called again, not finished
    assert bad_init.calls == [("init",)]
    failed = named(events, "tracker_failed")
    assert [(e["tracker"], e["during"], e["error_type"], e["error"]) for e in failed] == [
        ("bad_init", "init", "RuntimeError", "no server"),
        ("bad_log", "log", "ValueError", "bad value"),
    ]  # inits first, in order, then the records
    assert all(e["log_level"] == "warning" and e["run_id"] == "run-ctx" for e in failed)  # the context carried over
    assert good.threads == {"trackers"}  # every call on the one thread
    assert not named(events, "tracker_close_timeout")


@pytest.mark.serial  # 50 ms per log call, close within 0.45-1.0 s
def test_a_slow_tracker_never_slows_log_and_close_gives_up_at_its_timeout(events):
    slow = FakeTracker("slow", log_wait_s=5.0)
    trackers = Trackers([slow])
    try:
        took = []
        for step in range(200):
            t0 = time.perf_counter()
            trackers.log({"step": step, "reward/mean": 1.0}, step=step)
            took.append(time.perf_counter() - t0)
        assert max(took) < 0.05, max(took)  # a queue put, whatever the tracker does

        t0 = time.perf_counter()
        trackers.close(timeout_s=0.5)
        elapsed = time.perf_counter() - t0
        assert 0.45 <= elapsed < 1.0, elapsed
        (timeout,) = named(events, "tracker_close_timeout")
        assert (timeout["timeout_s"], timeout["trackers"], timeout["log_level"]) == (0.5, ["slow"], "warning")
        assert timeout["records_pending"] >= 198
        assert ("finish",) not in slow.calls
        assert not named(events, "tracker_records_dropped")  # 200 records fit the queue
        trackers.log({"reward/mean": 2.0}, step=999)  # after close: ignored, no error
    finally:
        slow.release.set()  # lets the thread run down instead of sleeping 5 s per record


def test_a_full_queue_drops_records_warns_once_and_counts_at_close(events):
    gate = threading.Event()  # the tracker's init blocks: nothing leaves the queue
    stuck = FakeTracker("stuck", init_gate=gate)
    trackers = Trackers([stuck], queue_size=3)
    try:
        for step in range(10):
            trackers.log({"reward/mean": 1.0}, step=step)
        trackers.log(None, step="not a step")  # never raises: counted as dropped
        dropped = named(events, "tracker_records_dropped")
        assert [(e["count"], e["queue_size"]) for e in dropped] == [(1, 3)]  # once, at the first drop

        t0 = time.perf_counter()
        trackers.close(timeout_s=0.3)  # the close marker cannot even be queued
        assert time.perf_counter() - t0 < 0.8
        dropped = named(events, "tracker_records_dropped")
        assert [e.get("at_close") for e in dropped] == [None, True]
        assert dropped[-1]["count"] == 8 and dropped[-1]["log_level"] == "warning"
        assert len(named(events, "tracker_close_timeout")) == 1
        assert stuck.calls == [("init",)]
        gate.set()  # the tracker comes back: the thread drains the queue and finishes it anyway
        deadline = time.monotonic() + 5
        while ("finish",) not in stuck.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [c[1] for c in stuck.calls if c[0] == "log"] == [0, 1, 2]
        assert stuck.calls[-1] == ("finish",)
    finally:
        gate.set()


def test_close_flushes_every_record_then_finishes_once():
    t = FakeTracker("t")
    trackers = Trackers([t])
    for step in range(50):
        trackers.log({"reward/mean": float(step)}, step=step)
    trackers.close(timeout_s=10)
    trackers.close(timeout_s=10)  # a second close does nothing
    assert [c[1] for c in t.calls if c[0] == "log"] == list(range(50))
    assert t.calls[-1] == ("finish",) and t.calls.count(("finish",)) == 1


def test_no_trackers_configured_starts_no_thread(tmp_path):
    cfg = config(tmp_path)
    before = threading.active_count()
    trackers = Trackers.start(cfg, run_dir=run_dir(cfg), run_id="x")
    trackers.log(RECORDS[0], step=0)
    trackers.close(timeout_s=1)
    assert threading.active_count() == before
    assert not run_dir(cfg).exists()  # and writes nothing


# ---- in the trainer -------------------------------------------------------------------


def test_a_training_run_reaches_every_tracker_and_a_resume_continues_it(
    tmp_path, tiny_model_path, fake_engine, trackio_store
):
    """The trainer's step and eval records, with the names of trainer/metrics.py, at their
    steps, in all three trackers (fake engine: the trainer, queue, workers are real)."""
    from tests.helpers import LetterTask
    from tests.trainer.test_resume import config as run_config
    from trackio.sqlite_storage import SQLiteStorage
    from trainer import Trainer
    from trainer import metrics as M

    overrides = ["log.trackers=[tensorboard,wandb,trackio]", "log.run_name=r", "eval.every=2", "eval.prompts=2"]
    cfg = run_config(tmp_path / "run", tiny_model_path, "run.steps=3", *overrides)
    history = Trainer(cfg, task=LetterTask()).fit()

    acc = tensorboard_events(cfg)
    assert scalars(acc, M.REWARD_MEAN) == [(h[M.STEP], h[M.REWARD_MEAN]) for h in history]
    assert [s for s, _ in scalars(acc, M.PERF_STEP_S)] == [0, 1, 2]
    assert scalars(acc, M.EVAL_PASS_AT_1) == [(2, 0.25), (3, 0.25)]  # fake engine: 1 of 4 samples scores 1
    run_id = wandb_id(cfg)
    ((_, wandb_config, rows, _, finished),) = wandb_run(run_dir(cfg), run_id)
    assert [r[WANDB_STEP_METRIC] for r in rows if M.REWARD_MEAN in r] == [0, 1, 2]
    assert [r[WANDB_STEP_METRIC] for r in rows if M.EVAL_PASS_AT_K in r] == [2, 3]
    assert wandb_config["eval"]["every"] == 2 and finished
    assert [row["step"] for row in SQLiteStorage.get_logs("rl-trainer", "r") if M.LOSS_POLICY in row] == [0, 1, 2]

    # Resumed from its checkpoint at step 3 with one more step: the same wandb run goes on.
    cfg = run_config(tmp_path / "run", tiny_model_path, "run.steps=4", *overrides)
    Trainer(cfg, task=LetterTask()).fit()
    assert wandb_id(cfg) == run_id
    assert [r[WANDB_STEP_METRIC] for _, _, rows, _, _ in wandb_run(run_dir(cfg), run_id) for r in rows
            if M.REWARD_MEAN in r] == [0, 1, 2, 3]
    assert [s for s, _ in scalars(tensorboard_events(cfg), M.REWARD_MEAN)] == [0, 1, 2, 3]
    assert [row["step"] for row in SQLiteStorage.get_logs("rl-trainer", "r") if M.LOSS_POLICY in row] == [0, 1, 2, 3]
