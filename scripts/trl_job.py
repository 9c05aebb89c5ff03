"""TRL's GRPOTrainer on the project's default job, for scripts/bench_time_to_quality.py.

    ~/.cache/rl-trainer/bench-trl-venv/bin/python scripts/trl_job.py \
        --model ~/.cache/rl-trainer/models/smollm2 --output-dir /tmp/trl-0 --seed 0

Runs in its own virtual environment (torch + trl, no vLLM, not the project's venv):
bench_time_to_quality.trl_python() builds it. TRL is a benchmark dependency, never a
runtime one; this file imports from the project only its task (prompts and reward) and
its metric names, which need neither torch nor vLLM.

The job is the project's default one, matched setting for setting where TRL has the
setting: the arithmetic task at run.seed, 4 prompts x 8 samples per optimizer step
(micro-batches of 16, so one generation per step: on-policy), 48 completion tokens,
temperature 1, lr 3e-5 constant, clip 0.2 / 0.28, no KL, advantages scaled by the
group's std, the token mean over the batch (TRL's "dapo"), grad norm 1.0, no activation
checkpointing. Generation is TRL's own (transformers' generate, the training model). --dtype mixed (the default):
float32 weights and optimizer, bf16 autocast, as the project's trainer.dtype=auto on
this CPU; float32: TRL's defaults.

Writes RUN_DIR/metrics.jsonl in the project's format, so the benchmark reads both alike:
a step record per optimizer step (perf/step_s, perf/elapsed_s) and an eval record
before training, every --eval-every steps and after the last (eval/pass@1 of the
held-out set that the project's eval uses: the arithmetic task at eval.seed, --eval-
prompts x --eval-samples, temperature 1, 48 tokens; perf/eval_s its own time).
perf/elapsed_s counts from before the model is loaded, as the project's counts from
before its policy and engines are.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer import metrics as M  # noqa: E402
from trainer.config import EvalConfig, TaskConfig  # noqa: E402
from trainer.tasks import ArithmeticTask, Prompt, build_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local model directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-train-s", type=float,
                   help="stop after the first step at which the training time (evaluations excluded) reaches this, "
                        "with an evaluation there")
    p.add_argument("--dtype", choices=["mixed", "float32"], default="mixed")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps the memory the process frees, as the project's CPU trainer does "
                        "(trainer.keep_freed_memory)")
    args = p.parse_args()
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.keep_freed_memory:
        from workers.hardware import keep_freed_memory  # torch only, which this venv has

        print(f"keep_freed_memory: {keep_freed_memory()}", file=sys.stderr, flush=True)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t0 = time.monotonic()
    task_cfg = TaskConfig()
    task = build_task(task_cfg, args.seed)
    assert isinstance(task, ArithmeticTask)
    groups_per_step, group_size, max_tokens = 4, 8, 48
    prompts = [task.prompt(i) for i in range(args.steps * groups_per_step)]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q.text}], "answer": q.answer, "index": q.index} for q in prompts
    ])

    def arithmetic_reward(completions, answer, index, **_):
        return [task.reward(c[0]["content"], Prompt(index=i, text="", answer=a))
                for c, a, i in zip(completions, answer, index)]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=args.dtype == "mixed", seed=args.seed,
        max_steps=args.steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=group_size * groups_per_step // 16,
        num_generations=group_size, max_completion_length=max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=3e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group", loss_type="dapo",
        # TRL turns activation checkpointing on by default; the project's trainer does not
        # use it, and this job fits in memory without it (it costs a recompute per step).
        gradient_checkpointing=False,
        logging_steps=1, report_to=[], save_strategy="no", disable_dropout=True, log_completions=False,
    )
    metrics_file = (out / "metrics.jsonl").open("a")

    def write(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    ev = EvalConfig()
    eval_task = build_task(task_cfg, ev.seed)
    eval_prompts = [eval_task.prompt(i) for i in range(args.eval_prompts)]

    eval_s = [0.0]  # the evaluations' time so far, not training time

    def evaluate(model, step: int) -> None:
        t_eval = time.monotonic()
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q.text}], add_generation_prompt=True,
                                               tokenize=False) for q in eval_prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "mixed"):
            ids = model.generate(
                **batch, do_sample=True, temperature=ev.temperature, top_p=1.0, top_k=0, max_new_tokens=max_tokens,
                num_return_sequences=args.eval_samples, pad_token_id=tokenizer.pad_token_id,
            )
        model.train(was_training)
        completions = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = [eval_task.reward(c, eval_prompts[j // args.eval_samples]) for j, c in enumerate(completions)]
        passed = [s >= ev.pass_threshold for s in scores]
        write({
            M.STEP: step, M.EVAL_PASS_AT_1: sum(passed) / len(passed), M.EVAL_REWARD_MEAN: sum(scores) / len(scores),
            M.EVAL_K: args.eval_samples, M.EVAL_PROMPTS: len(eval_prompts),
            M.PERF_EVAL_S: time.monotonic() - t_eval, M.PERF_ELAPSED_S: time.monotonic() - t0,
        })
        eval_s[0] += time.monotonic() - t_eval

    class Timing(TrainerCallback):
        """A step record per optimizer step, and the held-out evaluations."""

        def __init__(self):
            self.t_step = None

        def on_train_begin(self, args_, state, control, model=None, **_):
            evaluate(model, 0)
            self.t_step = time.monotonic()

        def on_step_end(self, args_, state, control, model=None, **_):
            now = time.monotonic()
            write({M.STEP: state.global_step - 1, M.PERF_STEP_S: now - self.t_step, M.PERF_TRAIN_S: None,
                   M.PERF_ELAPSED_S: now - t0})
            out_of_time = args.max_train_s is not None and now - t0 - eval_s[0] >= args.max_train_s
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps or out_of_time:
                evaluate(model, state.global_step)
            control.should_training_stop = control.should_training_stop or out_of_time
            self.t_step = time.monotonic()

    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timing()])
    trainer.train()
    metrics_file.close()


if __name__ == "__main__":
    main()
