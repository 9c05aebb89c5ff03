"""Post-train a language model with GRPO, generating with vLLM engines in worker threads.

Runbook
-------
    make train                                   # set up, then the default run below
    python scripts/train.py                      # SmolLM2-135M-Instruct on arithmetic
    python scripts/train.py model.path=tiny run.steps=3 run.output_dir=/tmp/run1
    python scripts/train.py --config my.yaml algo.max_staleness=2 engine.count=2
    python scripts/train.py --max-restarts 2 run.output_dir=runs/long   # resumes after a crash
    python scripts/train.py trainer.ranks=2 model.path=tiny run.steps=3  # 2 training processes (FSDP2)
    kill -TERM <launcher pid>                    # finish the step, checkpoint, exit 143
    python scripts/train.py run.output_dir=runs/long   # continues from its last checkpoint

Configuration: the defaults in trainer/config.py, then the YAML file given with
--config, then `section.key=value` overrides (values parsed as YAML). An unknown key
or a bad value stops the run before any engine starts, naming the key.

Output: one JSON object per line on stdout when it is not a terminal (or with
--log-format json), vLLM's engine processes included: a `train_step` event per step with
the metrics (also appended to RUN_DIR/metrics.jsonl), the final model in RUN_DIR/model,
and the metrics plotted to RUN_DIR/metrics.png. On a terminal: console logs and a
progress bar on stderr.

Exit codes (trainer/errors.py): 0 done; 1 fatal error (engine dead, engine hung, worker
failure, the training process killed), logged as one final `run_failed` event with the
error type, worker, engine, step and traceback; 2 bad config or input (`config_error`
event); 130 / 143 stopped by SIGINT / SIGTERM (`run_interrupted` event).

Process layout: this process is a launcher. It trains in a child process (this script
again, with RLT_TRAIN_CHILD set) in its own session and process group, forwards SIGINT
and SIGTERM to it, and once the child has ended, however it ended (exit, exception,
SIGKILL, OOM kill), kills whatever is left of its process group: no vLLM engine process
outlives the run; then it removes the weights' shared memory (/dev/shm/rlt-<launcher
pid>-*) and vLLM's message-queue segments (/dev/shm/psm_* made during the run, used by
no live process) that a killed child left. With --max-restarts N, a fatal end (exit 1, or the child killed) is
followed by a restart from the last checkpoint (run.resume=auto), at most N times, each
logged as a `run_restart` event. --no-launcher trains in this process instead.

With trainer.ranks=N the training child runs torch's elastic agent (torchrun's
machinery), which starts N ranks (this script again, each in a session of its own; the
launcher is their subreaper, so its cleanup still finds every one). A rank that fails
ends the others within seconds, and the child logs the run's one `run_failed`, naming
the rank (trainer/ranks.py). Signals reach rank 0, which stops the run for all ranks.

Signals: the first SIGINT/SIGTERM finishes (or, while waiting for rollouts, abandons) the
current step, writes a checkpoint, shuts the engines down and exits 130/143; a second
stops at once (engines still shut down, no checkpoint); a third makes the launcher
SIGKILL the child's process group.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GRPO post-training with vLLM worker threads.",
        epilog="overrides: section.key=value, e.g. run.steps=3 model.path=tiny",
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--log-format", choices=["auto", "json", "console"], help="default: log.format")
    p.add_argument(
        "--max-restarts", type=_non_negative_int, default=0, metavar="N",
        help="after a fatal error (exit 1, or the training process killed), restart from the last "
        "checkpoint (run.resume=auto), at most N times (default 0)",
    )
    p.add_argument(
        "--no-launcher", action="store_true",
        help="train in this process, not in a child process group (if this process is killed, "
        "its engine processes are orphaned)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # overrides may come before and after options


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# Set in the training child: the launcher's PID.
CHILD_ENV = "RLT_TRAIN_CHILD"
# Set in each trainer rank (trainer.ranks > 1): where it writes its failure record.
RANKS_DIR_ENV = "RLT_RANKS_DIR"  # the same as trainer.ranks.RANKS_DIR_ENV


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launcher_pid = os.environ.pop(CHILD_ENV, None)
    if launcher_pid is not None:
        _die_with_launcher(int(launcher_pid))
        code = _train(argv)
    elif RANKS_DIR_ENV in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        code = _main(argv)  # a rank, started by _launch_ranks (or by the user's torchrun)
    elif parse_args(argv).no_launcher:
        code = _train(argv)
    else:
        code = launch(argv)
    # The final event is the run's last word for ops tooling: vLLM's finalizers log
    # "[shutdown] ..." records at interpreter exit, after everything is already down.
    logging.disable(logging.CRITICAL)
    # The interpreter's last garbage collection walks every object torch, transformers
    # and vLLM made (~2 s); frozen objects are skipped, so the process (and a rank's
    # peers, waiting for its sockets to close) ends sooner.
    gc.freeze()
    return code


def _main(argv: list[str] | None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Defaults before anything imports vLLM: a bounded KV cache on CPU.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import structlog

    from trainer.config import TrainerConfig
    from trainer.errors import ConfigError, ExitCode
    from trainer.log import configure_logging

    configure_logging(args.log_format or "auto")
    log = structlog.get_logger("train")
    try:
        cfg = TrainerConfig.load(args.config, args.overrides)
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    configure_logging(args.log_format or cfg.log.format, cfg.log.level)

    from trainer.trainer import Trainer

    trainer = Trainer(cfg)
    log = log.bind(run_id=trainer.run_id)  # the final event names the run too
    if trainer.world > 1:
        log = log.bind(rank=trainer.rank)
    try:
        history = trainer.fit()
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt as e:
        from trainer.errors import RunInterrupted

        if isinstance(e, RunInterrupted):
            log.warning(
                "run_interrupted", signal=signal.Signals(e.signum).name, graceful=e.graceful,
                step=e.step, checkpoint=e.checkpoint,
            )
            return e.exit_code
        log.warning("run_interrupted", signal="SIGINT", graceful=False, step=trainer.step, checkpoint=None)
        return ExitCode.SIGINT
    except BaseException as e:  # noqa: BLE001 - every fatal error ends as one log line and exit 1
        worker = trainer.failed_worker
        fields = dict(
            error_type=type(e).__name__,
            error=str(e),
            worker=worker.name if worker else None,
            engine=worker.index if worker else None,
            step=trainer.step,
            # The error's own fields: a reward error names the function, prompt and time.
            **getattr(e, "log_fields", {}),
        )
        if trainer.world == 1:
            log.error("run_failed", **fields, exc_info=e)
            return ExitCode.FATAL
        # One rank of several: the process running the ranks logs the run's run_failed,
        # naming the rank that failed first (a rank that only saw another one go is not it).
        import traceback

        from trainer.ranks import is_peer_failure, write_failure_record

        peer = is_peer_failure(e)
        write_failure_record(trainer.rank, {**fields, "traceback": traceback.format_exception(e)}, peer)
        if peer:
            log.warning("rank_stopped", **fields)
        else:
            log.error("rank_failed", **fields, exc_info=e)
        return ExitCode.FATAL
    if trainer.rank != 0:
        return trainer.stop_code  # rank 0 has logged the run's last line
    log.info("run_done", steps=len(history), output_dir=str(trainer.output_dir))
    return ExitCode.OK


# ---- trainer ranks -----------------------------------------------------------------------


def _train(argv: list[str]) -> int:
    """Train in this process, or (trainer.ranks > 1) in ranks started from it."""
    from trainer.config import TrainerConfig
    from trainer.errors import ConfigError

    args = parse_args(argv)
    try:
        ranks = TrainerConfig.load(args.config, args.overrides).trainer.ranks
    except ConfigError:
        ranks = 1  # _main reports it
    return _launch_ranks(argv) if ranks > 1 else _main(argv)


def _launch_ranks(argv: list[str]) -> int:
    """trainer.ranks processes under torch's elastic agent (torchrun's machinery, run
    here), each this script again. SIGINT/SIGTERM go to rank 0, which stops the run as
    one rank would and then stops the others. When a rank fails, the agent stops the
    rest within a second; this process then logs the run's one `run_failed`, naming the
    rank that failed first and why (trainer/ranks.py)."""
    import shutil
    import tempfile
    import uuid

    import psutil
    import structlog
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trainer.config import TrainerConfig
    from trainer.errors import ConfigError, ExitCode
    from trainer.log import configure_logging
    from trainer.ranks import check_layout, read_failure_records

    args = parse_args(argv)
    cfg = TrainerConfig.load(args.config, args.overrides)
    configure_logging(args.log_format or cfg.log.format, cfg.log.level)
    run_id = uuid.uuid4().hex[:12]
    log = structlog.get_logger("train").bind(run_id=run_id)
    try:
        check_layout(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    # The agent's own log lines would come after the run's last line.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    folder = tempfile.mkdtemp(prefix="rlt-ranks-")
    os.environ[RANKS_DIR_ENV] = folder

    def to_rank0(signum, frame):
        for p in psutil.Process().children():
            try:
                if p.environ().get("RANK") == "0":
                    os.kill(p.pid, signum)
            except (psutil.Error, OSError):
                pass

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, to_rank0)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.trainer.ranks, run_id=run_id,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGINT and SIGTERM: to_rank0
        shutdown_timeout=5,  # a rank told to stop after another failed gets 5 s, then SIGKILL
    )
    log.info("ranks_starting", ranks=cfg.trainer.ranks)
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(__file__), *argv)
        return ExitCode.OK
    except ChildFailedError as e:
        return _ranks_failed(log, e.failures, read_failure_records(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ranks_failed(log, failures: dict, records: list[dict]) -> int:
    """The run's last line after a rank ended badly: the first rank that failed by itself
    (not because a peer went), else the rank killed by a signal; nothing if rank 0 ended
    the run itself (bad input, a stop), as it logged the last line already."""
    from trainer.errors import ExitCode

    said_why = (ExitCode.BAD_INPUT, ExitCode.SIGINT, ExitCode.SIGTERM)
    primary = [r for r in records if not r.get("peer_failure")]
    if primary:
        log.error("run_failed", **{k: v for k, v in primary[0].items() if k not in ("time", "peer_failure")})
        return ExitCode.FATAL
    if 0 in failures and failures[0].exitcode in said_why:
        return failures[0].exitcode  # the agent then stopped the others with SIGTERM
    # Killed by a signal: the first, but SIGTERM last, as it is what the agent stops the
    # other ranks with once one has gone (the timestamps are whole seconds, often equal).
    killed = sorted(
        (f.exitcode == -signal.SIGTERM, f.timestamp, rank, f) for rank, f in failures.items() if f.exitcode < 0
    )
    if killed:
        *_, rank, f = killed[0]
        name = signal.Signals(-f.exitcode).name
        log.error(
            "run_failed", error_type="ProcessKilled", error=f"rank {rank} (pid {f.pid}) was killed by {name}",
            signal=name, rank=rank, pid=f.pid, worker=None, engine=None, step=None,
        )
        return ExitCode.FATAL
    if records:
        log.error("run_failed", **{k: v for k, v in records[0].items() if k not in ("time", "peer_failure")})
        return ExitCode.FATAL
    rank, f = min(failures.items(), key=lambda kv: kv[1].timestamp)
    log.error(
        "run_failed", error_type="RankFailed", error=f"rank {rank} (pid {f.pid}) exited with {f.exitcode}",
        rank=rank, pid=f.pid, worker=None, engine=None, step=None,
    )
    return ExitCode.FATAL


# ---- the launcher ------------------------------------------------------------------------


def launch(argv: list[str]) -> int:
    """Run the training in a child process group; see the module docstring."""
    args = parse_args(argv)
    import structlog

    from trainer.config import TrainerConfig
    from trainer.errors import ConfigError, ExitCode
    from trainer.log import QUIET_PROGRESS_ENV, active_format, configure_logging, relay_stderr, stderr_record
    from workers import shm

    configure_logging(args.log_format or "auto")
    log = structlog.get_logger("launcher")
    try:  # a bad config needs no child process
        cfg = TrainerConfig.load(args.config, args.overrides)
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    configure_logging(args.log_format or cfg.log.format, cfg.log.level)
    # JSON mode: every line on stderr too is a JSON object. The training process group's
    # stderr (native code, warnings, progress bars, whatever its processes write to fd 2)
    # comes through a pipe and out as JSON records (trainer/log.py relay_stderr).
    json_mode = active_format() == "json"

    def note(text: str) -> None:
        print(stderr_record(text, os.getpid()) if json_mode else text, file=sys.stderr, flush=True)

    signals: list[int] = []  # received by the launcher, forwarded to the child
    pending: list[int] = []  # received while no child could take them (being started)
    child: subprocess.Popen | None = None

    def deliver(signum: int) -> None:
        try:
            if len(signals) >= 3:  # the child did not stop on two: stop waiting for it
                os.killpg(child.pid, signal.SIGKILL)
                _signal_all(_descendants(child.pid), signal.SIGKILL)
            else:
                os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def forward(signum, frame):
        signals.append(signum)
        if child is None or child.returncode is not None:
            pending.append(signum)
        else:
            deliver(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    _become_subreaper()

    child_argv = list(argv)
    restarts = 0
    while True:
        if signals:  # stopped between two children
            return _stopped_code(signals[0])
        started = time.monotonic()
        segments_before = shm.segments()  # to tell the run's vLLM segments from others'
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *child_argv],
            env={
                **os.environ, **(QUIET_PROGRESS_ENV if json_mode else {}),
                CHILD_ENV: str(os.getpid()), shm.OWNER_ENV: str(os.getpid()),
            },
            start_new_session=True,  # its own session and process group: pgid == pid
            stderr=subprocess.PIPE if json_mode else None,
        )
        relay = relay_stderr(child.stderr, sys.stderr, child.pid) if json_mode else None
        while pending:  # arrived while it was being started
            deliver(pending.pop(0))
        log.info("training_process_started", pid=child.pid, restart=restarts)
        # Wait without reaping, so that the PID (the group's id) cannot be reused until
        # the group is killed.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        orphans = _kill_process_group(child.pid, launcher=os.getpid())
        # Only once nothing of the run is left: the weights' shared memory it did not
        # get to unlink (killed before every engine had mapped it), and vLLM's message
        # queue segments (/dev/shm/psm_*) that its killed engine processes left; and the
        # engines' scratch directories in /tmp (their sockets, torch's FileStore).
        shm_removed = shm.sweep(os.getpid()) + shm.sweep_segments(segments_before)
        tmp_removed = shm.sweep(os.getpid(), shm.TMP_DIR)
        if relay is not None:  # the group is gone: the pipe is at its end
            relay.join(timeout=2.0)
            child.stderr.close()
        child.wait()
        rc = child.returncode
        # The child's last line (run_done, run_failed, ...) stays the run's last line:
        # from here the launcher logs only a run_failed for a killed child, or a restart.
        if orphans:
            note(f"train.py launcher: killed processes left by the training process {child.pid}: {orphans}")
        if shm_removed:
            note(f"train.py launcher: removed shared memory left by the training process {child.pid}: {shm_removed}")
        if tmp_removed:
            note(f"train.py launcher: removed scratch directories left by the training process {child.pid}: {tmp_removed}")
        if signals:  # a stop was asked for: no restart
            return _stopped_code(signals[0]) if rc < 0 else rc
        if rc < 0:  # killed: it could not say why, so the launcher does
            name = signal.Signals(-rc).name
            log.error(
                "run_failed", error_type="ProcessKilled", error=f"the training process {child.pid} was killed by {name}",
                signal=name, worker=None, engine=None, step=None, pid=child.pid, orphans_killed=orphans,
                shm_removed=shm_removed, tmp_removed=tmp_removed, will_restart=restarts < args.max_restarts,
            )
            rc = ExitCode.FATAL
        if rc != ExitCode.FATAL or restarts >= args.max_restarts:
            return rc
        restarts += 1
        log.warning(
            "run_restart", restart=restarts, max_restarts=args.max_restarts, exit_code=child.returncode,
            ran_s=round(time.monotonic() - started, 1), orphans_killed=orphans,
        )
        child_argv = [*argv, "run.resume=auto"]


def _stopped_code(signum: int) -> int:
    from trainer.errors import ExitCode

    return ExitCode.SIGTERM if signum == signal.SIGTERM else ExitCode.SIGINT


def _become_subreaper() -> None:
    """Processes orphaned under the child (a rank's engines when the rank is killed, say)
    become this process's children instead of init's, so _kill_process_group finds them
    even outside the child's process group (torch's launcher starts each rank in a
    session of its own)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _descendants(child_pid: int) -> list[int]:
    """This process's live descendants but the child (waited on without being reaped);
    ended processes reparented to this subreaper are reaped."""
    import psutil

    from workers.processes import running

    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.pid == child_pid:
                continue
            if not running(p):
                if p.ppid() == os.getpid():
                    os.waitpid(p.pid, os.WNOHANG)
                continue
            found.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_process_group(pgid: int, launcher: int | None = None) -> list[int]:
    """Make sure no process of the group runs on, nor (given `launcher`, this process,
    the subreaper) any other of its descendants: a short grace period for processes that
    are about to exit anyway (multiprocessing's resource tracker cleans up shared memory
    once the child is gone), then SIGTERM, then SIGKILL. Returns the PIDs that had to be
    signalled (an engine orphaned by a killed child, say)."""
    import psutil

    from workers.processes import running

    def group() -> list[int]:
        found = set(_descendants(pgid) if launcher is not None else ())
        for p in psutil.process_iter():
            try:
                if p.pid != pgid and os.getpgid(p.pid) == pgid and running(p):
                    found.add(p.pid)
            except (OSError, psutil.Error):
                pass
        return sorted(found)

    def wait_gone(seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while (left := group()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    signalled = wait_gone(0.5)
    # vLLM's EngineCore takes seconds to act on SIGTERM, and an orphaned one has no
    # work worth finishing: a short wait only.
    for sig, wait_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        left = group()
        if not left:
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        _signal_all(left, sig)
        wait_gone(wait_s)
    return signalled


def _die_with_launcher(launcher_pid: int) -> None:
    """In the training child: get SIGTERM (a graceful stop) if the launcher dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
