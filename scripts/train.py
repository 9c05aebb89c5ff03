"""Post-train a language model with GRPO, generating with vLLM engines in worker threads.

Runbook
-------
    make train                                   # set up, then the default run below
    python scripts/train.py                      # SmolLM2-135M-Instruct on arithmetic
    python scripts/train.py model.path=tiny run.steps=3 run.output_dir=/tmp/run1
    python scripts/train.py --config my.yaml algo.max_staleness=2 engine.count=2

Configuration: the defaults in trainer/config.py, then the YAML file given with
--config, then `section.key=value` overrides (values parsed as YAML). An unknown key
or a bad value stops the run before any engine starts, naming the key.

Output: one JSON object per line on stdout when it is not a terminal (or with
--log-format json): a `train_step` event per step with the metrics (also appended to
RUN_DIR/metrics.jsonl), and the final model in RUN_DIR/model.

Exit codes (trainer/errors.py): 0 done; 1 fatal error (engine dead, engine hung, worker
failure), logged as one `run_failed` event with the error type, worker, engine, step
and traceback; 2 bad config or input (`config_error` event); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GRPO post-training with vLLM worker threads.",
        epilog="overrides: section.key=value, e.g. run.steps=3 model.path=tiny",
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--log-format", choices=["auto", "json", "console"], help="default: log.format")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    # The final event is the run's last word for ops tooling: vLLM's finalizers log
    # "[shutdown] ..." records at interpreter exit, after everything is already down.
    logging.disable(logging.CRITICAL)
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
    try:
        history = trainer.fit()
    except ConfigError as e:
        log.error("config_error", key=e.key, error=str(e))
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        log.warning("run_interrupted")
        return ExitCode.SIGINT
    except BaseException as e:  # noqa: BLE001 - every fatal error ends as one log line and exit 1
        worker = trainer.failed_worker
        log.error(
            "run_failed",
            error_type=type(e).__name__,
            error=str(e),
            worker=worker.name if worker else None,
            engine=worker.index if worker else None,
            step=len(trainer.history),
            exc_info=e,
        )
        return ExitCode.FATAL
    log.info("run_done", steps=len(history), output_dir=str(trainer.output_dir))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
