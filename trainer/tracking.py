"""Experiment tracking: every metrics record to TensorBoard, Weights & Biases and/or
trackio (`log.trackers`), without ever failing or slowing the training.

    check_trackers(cfg.log)          # at start: a tracker whose package is missing is a ConfigError
    trackers = Trackers.start(cfg, run_dir=pathlib.Path(cfg.run.output_dir), run_id="abc123",
                              start_step=0, resumed=False)   # returns at once
    trackers.log(record, step=N)     # returns at once, never raises
    trackers.close(timeout_s=10.0)   # flushes and finishes; returns within ~timeout_s, never raises

How: `log` only puts the record on a bounded queue. One daemon thread serves the queue
and makes every tracker call, the trackers' own init included (wandb starts a service
process, and online it talks to a server: seconds, or minutes on a bad network). When
the queue is full the record is dropped (`tracker_records_dropped`, once, and the count
at close). A tracker whose init, log or finish raises is reported once
(`tracker_failed`) and not called again; the others go on. `close` waits at most
timeout_s for the queue to drain and the trackers to finish, then gives up
(`tracker_close_timeout`); the thread, a daemon, goes on until the process ends.

What a tracker gets: the record's numbers at `step` (ints and floats; booleans as 0/1).
None, NaN and infinities, strings and the record's own "step" key are left out. The
config (`cfg.to_dict()`) goes along once, at init.

* tensorboard: event files in RUN_DIR/tensorboard, one scalar per metric; the config as
  hparams (the HParams tab; flattened "section.key") and as YAML text (the Text tab).
  purge_step=start_step: what older event files hold from start_step on is hidden, so
  a resumed run's redone steps replace those logged after its checkpoint (and a fresh
  start, at step 0, hides an earlier run's events in the same directory).
* wandb: RUN_DIR/wandb. Offline unless credentials are set (WANDB_API_KEY, or a
  `wandb login` entry in ~/.netrc) or WANDB_MODE says otherwise; offline runs upload
  later with `wandb sync RUN_DIR/wandb/offline-run-*`. The run id is kept in
  RUN_DIR/tracking.json: a resumed run continues the same wandb run. The trainer's step
  is the metric "trainer/step", the x-axis of every chart (define_metric), and wandb's
  own step just counts log calls: wandb drops a step lower than one it has seen, which
  a resumed run's first steps are (they redo those after its checkpoint).
* trackio: its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio; see it
  with `trackio show`), run named log.run_name; a resumed run continues the run of that
  name. No dashboard is launched and nothing leaves the machine unless the environment
  asks trackio for a Space or server (TRACKIO_SPACE_ID, TRACKIO_SERVER_URL).
"""

from __future__ import annotations

import builtins
import contextvars
import importlib.util
import json
import math
import netrc
import numbers
import os
import pathlib
import queue
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import structlog
import yaml

from trainer import metrics as M
from trainer.errors import ConfigError

log = structlog.get_logger(__name__)

# tracker -> (the module it needs, the pip package that provides it)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),  # torch.utils.tensorboard writes, tensorboard's protos
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
QUEUE_SIZE = 1000  # records waiting for the trackers: far more steps than a stalled init holds back
WANDB_STEP_METRIC = "trainer/step"
# wandb.finish and the atexit teardown wait this long for uploads, then give up (the data
# stays in RUN_DIR/wandb for `wandb sync`): the process exits, bounded, after `close`.
WANDB_FINISH_TIMEOUT_S = 60.0
TRACKING_FILE = "tracking.json"  # RUN_DIR/tracking.json: ids that a resumed run reuses

_CLOSE = object()  # the queue's last item


def check_trackers(log_cfg: Any) -> None:
    """A ConfigError (key log.trackers) naming the tracker and the pip package to install
    for the first tracker in `log_cfg.trackers` whose package is missing. Imports nothing."""
    for name in log_cfg.trackers:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"log.trackers: tracker '{name}' needs the '{package}' package, which is not installed: "
                f'pip install {package} (or pip install -e ".[track]" for every tracker)',
                key="log.trackers",
            )


@dataclass
class RunInfo:
    """What the trackers know about the run."""

    cfg: Any  # the TrainerConfig
    run_dir: pathlib.Path
    run_id: str
    start_step: int  # the first step this process logs
    resumed: bool  # continuing from a checkpoint
    name: str  # log.run_name, or the output directory's name


class Trackers:
    """The configured trackers behind one queue and one thread (see the module docstring).
    `trackers`: objects with `name` and init(), log(metrics, step), finish()."""

    def __init__(self, trackers: list[Any], queue_size: int = QUEUE_SIZE):
        self._trackers = list(trackers)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._dropped = 0
        self._closed = False
        self._thread = None
        if self._trackers:
            # The thread runs in a copy of this context: its events carry the structlog
            # context bound now (run_id, rank, ...).
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._serve,), name="trackers", daemon=True)
            self._thread.start()

    @classmethod
    def start(
        cls, cfg: Any, run_dir: pathlib.Path, run_id: str, start_step: int = 0, resumed: bool = False
    ) -> Trackers:
        """The trackers of `cfg.log.trackers`, initialising on their thread; returns at once.
        No tracker configured: no thread, and log/close do nothing."""
        run_dir = pathlib.Path(run_dir)
        run = RunInfo(cfg, run_dir, run_id, start_step, resumed, name=cfg.log.run_name or run_dir.resolve().name)
        return cls([TRACKERS[name](run) for name in cfg.log.trackers])

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Queue `record` (metric name -> value) for every tracker at `step`."""
        if self._thread is None or self._closed:
            return
        try:
            self._queue.put_nowait((dict(record), int(step)))
            return
        except queue.Full:
            why = {"detail": "the trackers are behind: records are dropped until they catch up (count at close)"}
        except Exception as e:  # a record that is no mapping, a step that is no number
            why = {"error_type": type(e).__name__, "error": str(e)}
        self._dropped += 1
        if self._dropped == 1:
            log.warning("tracker_records_dropped", count=1, queue_size=self._queue.maxsize, **why)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush the queue and finish every tracker, waiting at most `timeout_s`."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(_CLOSE, timeout=max(timeout_s, 0.0))  # waits while the queue is full
            self._thread.join(max(deadline - time.monotonic(), 0.0))
        except queue.Full:
            pass
        if self._dropped:
            log.warning("tracker_records_dropped", count=self._dropped, at_close=True)
        if self._thread.is_alive():
            log.warning(
                "tracker_close_timeout",
                timeout_s=timeout_s,
                trackers=[t.name for t in self._trackers],
                records_pending=self._queue.qsize(),
            )

    # ---- the thread -------------------------------------------------------------------

    def _serve(self) -> None:
        live = [t for t in self._trackers if self._call(t, "init")]
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._closed:  # close could not queue its marker (the queue was full): drained now
                    break
                continue
            if item is _CLOSE:
                break
            record, step = item
            metrics = numbers_of(record)
            if metrics:
                live = [t for t in live if self._call(t, "log", dict(metrics), step)]
        for t in live:
            self._call(t, "finish")

    @staticmethod
    def _call(tracker: Any, method: str, *args: Any) -> bool:
        """tracker.method(*args); False, after one warning, if it raised."""
        try:
            getattr(tracker, method)(*args)
            return True
        except BaseException as e:  # noqa: BLE001 - not even a SystemExit from a tracker stops the run
            log.warning(
                "tracker_failed",
                tracker=tracker.name,
                during=method,
                error_type=type(e).__name__,
                error=str(e),
                detail="this tracker is disabled for the rest of the run",
            )
            return False


def numbers_of(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The record's finite numbers, booleans as 0/1, without the "step" key (each tracker
    gets the step on its own)."""
    out: dict[str, int | float] = {}
    for name, value in record.items():
        if name == M.STEP:
            continue
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, numbers.Real):
            continue
        try:
            value = value if isinstance(value, (int, float)) else float(value)  # numpy scalars as floats
            if math.isfinite(value):
                out[name] = value
        except (OverflowError, ValueError):  # an int too large for a float
            continue
    return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"algo": {"lr": 3e-5}} -> {"algo.lr": 3e-5}; None and lists as JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run: RunInfo):
        self.run = run
        self.writer = None

    def init(self) -> None:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.run.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=self.run.start_step)
        config = self.run.cfg.to_dict()
        # The hparams go into the run's own directory (not add_hparams' sub-run), so the
        # HParams tab shows them beside this run's scalars.
        hparams = hparams_pb(_flatten(config), trial_id=self.run.run_id)
        self.writer._get_file_writer().add_summary(hparams, global_step=self.run.start_step)
        self.writer.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```", self.run.start_step)
        self.writer.flush()
        log.info("tracker_started", tracker=self.name, log_dir=str(log_dir), purge_step=self.run.start_step)

    def log(self, metrics: dict[str, int | float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        # Now, not every 2 minutes: TensorBoard shows each step as it comes, and a killed
        # run keeps its last steps.
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


def _wandb_has_credentials() -> bool:
    """An API key in the environment, or a `wandb login` entry in the netrc file for the
    W&B host (WANDB_BASE_URL)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one we cannot read
        return False
    return bool(entry and entry[2])


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one


class WandB:
    name = "wandb"

    def __init__(self, run: RunInfo):
        self.run = run
        self.wandb_run = None

    def init(self) -> None:
        # Nothing on stdout (it carries our JSON lines); set before wandb reads them.
        os.environ.setdefault("WANDB_SILENT", "true")
        user_mode = os.environ.get("WANDB_MODE")  # the user's choice wins
        mode = user_mode or ("online" if _wandb_has_credentials() else "offline")
        if mode in ("offline", "dryrun", "disabled"):
            # wandb's own telemetry (OpenTelemetry to the W&B server, from this process
            # and from wandb-core) ignores offline mode: without this an offline run
            # still tries to reach api.wandb.ai (seen: a DNS query at exit).
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        state_path = self.run.run_dir / TRACKING_FILE
        state = _read_json(state_path)
        run_id = (state.get("wandb_run_id") if self.run.resumed else None) or secrets.token_hex(4)
        _write_json(state_path, {**state, "wandb_run_id": run_id})
        settings = wandb.Settings(
            console="off",  # no stdout/stderr capture
            silent=True,
            save_code=False,
            disable_job_creation=True,
            finish_timeout=WANDB_FINISH_TIMEOUT_S,
        )
        self.wandb_run = wandb.init(
            project=self.run.cfg.log.project,
            name=self.run.name,
            dir=str(self.run.run_dir),
            config=self.run.cfg.to_dict(),
            id=run_id,
            resume="allow",
            # Explicit: wandb reads WANDB_MODE once per process. None: credentials are set,
            # so `wandb offline`'s setting or wandb's default (online).
            mode=user_mode or ("offline" if mode == "offline" else None),
            reinit="create_new",  # leaves any wandb run of the caller's alone
            settings=settings,
        )
        self.wandb_run.define_metric(WANDB_STEP_METRIC)
        self.wandb_run.define_metric("*", step_metric=WANDB_STEP_METRIC)
        offline = mode in ("offline", "dryrun")
        log.info(
            "tracker_started",
            tracker=self.name,
            mode=mode,
            wandb_run_id=run_id,
            dir=str(self.run.run_dir / "wandb"),
            **({"upload": f"wandb sync {self.run.run_dir / 'wandb'}/offline-run-*-{run_id}*"} if offline else {}),
        )

    def log(self, metrics: dict[str, int | float], step: int) -> None:
        self.wandb_run.log({**metrics, WANDB_STEP_METRIC: step})

    def finish(self) -> None:
        # The wandb-core service process stays for the next run in this process; it
        # exits with the process (it watches its parent's pid, even through a SIGKILL).
        self.wandb_run.finish()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _print_to_log(package: str) -> None:
    """Give `package`'s modules a print() that logs a debug event: trackio reports with
    print() to stdout, which carries our JSON lines."""

    def print_(*args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush: bool = False) -> None:
        if file is not None and file is not sys.stdout:
            builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
            return
        text = _ANSI.sub("", (sep if sep is not None else " ").join(map(str, args))).strip()
        if text:
            log.debug("tracker_output", tracker=package, text=text)

    for name, module in list(sys.modules.items()):
        if module is not None and (name == package or name.startswith(package + ".")):
            module.print = print_


class Trackio:
    name = "trackio"

    def __init__(self, run: RunInfo):
        self.run = run
        self.trackio_run = None

    def init(self) -> None:
        import trackio
        import trackio.utils

        _print_to_log("trackio")
        self.trackio_run = trackio.init(
            project=self.run.cfg.log.project,
            name=self.run.name,
            config=self.run.cfg.to_dict(),
            # A fresh start is a new run, even under an old name; a resumed one continues it.
            resume="allow" if self.run.resumed else "never",
            embed=False,  # no dashboard, not even in a notebook
            auto_log_cpu=False,  # no system-metrics threads: the trainer logs its own perf/
            auto_log_gpu=False,
        )
        log.info(
            "tracker_started",
            tracker=self.name,
            project=self.run.cfg.log.project,
            run_name=self.trackio_run.name,
            store=str(trackio.utils.TRACKIO_DIR),
        )

    def log(self, metrics: dict[str, int | float], step: int) -> None:
        self.trackio_run.log(metrics, step=step)

    def finish(self) -> None:
        self.trackio_run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
