"""Evaluate a saved model on a task: the metrics the trainer logs as its `eval` event.

Runbook
-------
    python scripts/evaluate.py runs/default/model                  # held-out arithmetic (eval.seed)
    python scripts/evaluate.py smollm2 eval.prompts=200 eval.samples=8
    python scripts/evaluate.py runs/default/model 'eval.task={name: jsonl, path: heldout.jsonl}'
    python scripts/evaluate.py --config my.yaml runs/long/model    # a run's eval and engine settings

MODEL is a model directory (config.json + safetensors + tokenizer: RUN_DIR/model is one)
or a built-in name ("smollm2", "tiny"). The configuration is the trainer's
(trainer/config.py): the eval section says what to evaluate (eval.task, eval.prompts,
eval.samples, eval.temperature, eval.max_tokens, eval.pass_threshold, eval.seed), the
engine section how (engine.count engines, engine.dtype, ...); the same seed gives the
same prompts and sampling as the trainer's evaluations.

Output: one JSON object on stdout, {"model": ..., "eval/pass@1": ..., "eval/pass@k": ...,
"eval/mean@k": ..., "eval/reward_mean": ..., "eval/completion_len": ..., ...}; the logs
go to stderr (JSON lines when it is not a terminal).

Exit codes (trainer/errors.py): 0 done; 1 fatal error (an engine died or hung; one
`eval_failed` event); 2 bad config, model or data (`config_error`); 130/143 stopped by
SIGINT/SIGTERM (the engines are shut down first). Engines run in this process: SIGKILL
of it orphans their processes (scripts/train.py's launcher is what prevents that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a saved model on a task with vLLM engines.")
    p.add_argument("model", help='a model directory (e.g. RUN_DIR/model) or "smollm2" / "tiny"')
    p.add_argument("--config", help="YAML config file (its eval and engine sections are used)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # before anything imports vLLM
    # stdout is the result alone: whatever writes to fd 1 from here on (this process's
    # logs, vLLM's engine processes, which inherit it) goes to stderr instead.
    result_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import structlog

    from trainer.config import TrainerConfig
    from trainer.errors import ConfigError, ExitCode
    from trainer.log import configure_logging

    configure_logging(args.log_format, stream=sys.stderr)
    log = structlog.get_logger("evaluate")
    supervisor = evaluator = None
    try:
        cfg = TrainerConfig.load(args.config, [*args.overrides, f"model.path={args.model}"])
        configure_logging(args.log_format, cfg.log.level, stream=sys.stderr)

        def stop(signum, frame):
            raise _Stopped(signum)

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, stop)

        from capacity import RolloutQueue
        from trainer.eval import Evaluator
        from trainer.models import load_tokenizer, resolve_model_path
        from trainer.trainer import build_engine
        from workers.supervisor import Supervisor
        from workers.worker import GenerationWorker

        model_path = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(model_path)
        evaluator = Evaluator(cfg, tokenizer)
        devices = cfg.engine.devices
        if devices is None:
            import torch

            devices = list(range(torch.cuda.device_count())) or None  # every GPU, or CPU engines
        count = len(devices) if devices else cfg.engine.count
        queue = RolloutQueue(0, 1)  # eval-only workers never take a permit

        def make_worker(i, on_error, start_gate):
            return GenerationWorker(
                i, build_engine=lambda: build_engine(cfg, model_path, i, devices[i] if devices else None),
                queue=queue, prompts=None, sampling=evaluator.sampling, rewards=evaluator.rewards,
                max_groups_in_flight=1, on_error=on_error, start_gate=start_gate,
            )

        supervisor = Supervisor(queue, make_worker, count, hang_timeout_s=cfg.engine.hang_timeout_s)
        supervisor.start()
        supervisor.wait_ready(cfg.engine.start_timeout_s)
        metrics = evaluator.run(supervisor, cfg.run.batch_timeout_s)
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    except (_Stopped, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        log.warning("eval_interrupted", signal=signal.Signals(signum).name)
        return ExitCode.SIGTERM if signum == signal.SIGTERM else ExitCode.SIGINT
    except BaseException as e:  # noqa: BLE001 - one log line and exit 1
        worker = supervisor.failed_worker if supervisor is not None else None
        log.error(
            "eval_failed", error_type=type(e).__name__, error=str(e),
            worker=worker.name if worker else None, engine=worker.index if worker else None, exc_info=e,
        )
        return ExitCode.FATAL
    finally:
        if supervisor is not None:
            supervisor.shutdown(timeout=cfg.engine.shutdown_timeout_s)
        if evaluator is not None:
            evaluator.shutdown()
    print(json.dumps({"model": str(model_path), **metrics}), file=result_out, flush=True)
    log.info("eval_done", model=str(model_path), **metrics)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
