"""The run configuration: typed sections, loaded from YAML plus dotted overrides.

The dataclass defaults below are the one home of every default, and together they are
the default run: SmolLM2-135M-Instruct learning arithmetic on a 2-core CPU.

Precedence: defaults < YAML file < `section.key=value` overrides. Every value is
type-checked against its field's annotation; an unknown key, a wrong type or a value out
of range raises `ConfigError` with `key` set to the dotted key at fault, before any
engine starts.

    cfg = TrainerConfig.load("my.yaml", ["run.steps=3", "engine.devices=[1,2]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Iterable, Literal, Mapping

import yaml

from trainer.errors import ConfigError
from trainer.metrics import KEEP_BEST_METRICS


@dataclasses.dataclass
class ModelConfig:
    path: str = "smollm2"
    """a model directory (config.json + safetensors + tokenizer), or a built-in name:
    "smollm2" (SmolLM2-135M-Instruct) or "tiny" (a small random Llama, for tests)"""


@dataclasses.dataclass
class RunConfig:
    steps: int = 20
    """optimizer steps to train for"""
    seed: int = 0
    """seeds torch, the task's prompts and every engine request"""
    output_dir: str = "runs/default"
    """where checkpoints, metrics.jsonl and the final model go"""
    checkpoint_every: int = 10
    """save a checkpoint every this many steps"""
    keep_checkpoints: int = 2
    """keep the last this many checkpoints; older ones are deleted"""
    resume: str = "auto"
    """"auto": continue from the latest valid checkpoint in output_dir if there is one;
    "never": start from step 0; any other value: the checkpoint directory to resume from"""
    batch_timeout_s: float = 600.0
    """longest wait for one batch of groups (and for one evaluation); worker health is
    checked all along, so this only fires when every engine is alive, making progress,
    and still too slow"""
    keep_best: str | None = None
    """an eval metric (e.g. "eval/pass@1"): the checkpoint of the best evaluation so far
    (highest value) is kept beside the last keep_checkpoints; needs eval.every > 0"""


@dataclasses.dataclass
class AlgoConfig:
    group_size: int = 8
    """completions sampled per prompt (G); advantages are relative within a group"""
    groups_per_step: int = 4
    """prompts (groups) per optimizer step"""
    max_staleness: int | Literal["auto"] = "auto"
    """how many policy versions generation may run ahead of training. "auto": 0 where
    the engines generate on the trainer's own compute (on CPU, or one GPU for both),
    1 where they have GPUs of their own. Sharing compute, overlap saves little time
    and staleness costs more learning than that (README, Time to quality)"""
    lr: float = 3e-5
    """AdamW learning rate (a 135M model learning an answer format in tens of steps)"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """the learning rate after warm-up: constant, or decayed over run.steps to
    lr * lr_min_ratio, linearly or along a half cosine (`AlgoConfig.lr_at`)"""
    lr_warmup_steps: int = 0
    """steps over which the learning rate rises linearly to algo.lr (step k of them:
    lr * (k + 1) / lr_warmup_steps)"""
    lr_min_ratio: float = 0.0
    """where linear and cosine decay end, as a fraction of algo.lr"""
    clip_low: float = 0.2
    """PPO clip: the ratio is clipped below at 1 - clip_low"""
    clip_high: float = 0.28
    """PPO clip: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher)"""
    is_cap: float = 2.0
    """truncated importance sampling: the policy/behaviour ratio is capped at this"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantages (reward - group mean) divided by the group's reward std, the batch's,
    or not at all (Dr.GRPO)"""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """how per-token terms make the loss: a mean over every token of the batch (DAPO), a
    mean over sequences of each one's token mean (GRPO paper), or token sums over
    sequences * gen.max_tokens (Dr.GRPO); trainer/loss.py has the formulas"""
    ratio_level: Literal["token", "sequence"] = "token"
    """importance ratio per token (PPO/GRPO), or per sequence as the geometric mean of
    its tokens' ratios (GSPO; use small clip_low/clip_high, e.g. 3e-4/4e-4)"""
    clip_against: Literal["behaviour", "proximal"] = "behaviour"
    """what the PPO clip bounds: the ratio to the behaviour policy (the engine's
    log-probs; a token whose ratio stale weights or the engine's numerics moved out of
    the clip range gets no gradient), or the ratio to the weights this step began with,
    the behaviour ratio only weighing each token (min(ratio, is_cap), no gradient):
    decoupled PPO (trainer/loss.py)"""
    entropy_coef: float = 0.0
    """weight of an entropy bonus in the loss (loss - entropy_coef * entropy);
    loss/entropy is logged either way"""
    kl_coef: float = 0.0
    """weight of a KL penalty to a frozen reference model (the initial policy, loaded
    beside it); 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """the per-token KL estimator (trainer/loss.py kl_penalty)"""
    filter_zero_std: bool = True
    """dynamic sampling (DAPO): a group whose rewards are all equal carries no signal; it
    is released (reason "filtered") and another prompt generated in its place. On by
    default: it reached 0.9 held-out accuracy on 3 of 3 seeds where the batches with
    such groups in reached it on 1 (README, Time to quality)"""
    filter_budget: float = 2.0
    """dynamic sampling releases at most this many groups per step, as a multiple of
    algo.groups_per_step; past it, groups without reward spread are trained on (they add
    nothing to the loss), so a policy that solves every prompt keeps stepping"""
    mask_truncated: bool = False
    """leave completions cut off by gen.max_tokens out of the loss (DAPO's overlong
    filtering); they still count in their group's advantages"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass; gradients accumulate over a step"""
    max_nonfinite_steps: int = 3
    """a step whose loss or gradient norm is NaN or infinite is skipped (the weights stay
    as they are, `step_skipped_nonfinite` is logged); this many such steps in a row fail
    the run"""

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of a run of `steps`: a
        function of these two alone, so a resumed run continues the schedule exactly.
        The decay runs from the end of warm-up to `steps` (a run extended past it stays
        at the end value), HF's convention: the last step is not at the end value."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.lr_warmup_steps) / max(1, steps - self.lr_warmup_steps))
        left = 1 - progress if self.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.lr_min_ratio + (1 - self.lr_min_ratio) * left)


@dataclasses.dataclass
class EngineConfig:
    count: int = 1
    """vLLM engines (one worker thread each) when the engines run on CPU"""
    devices: list[int] | None = None
    """GPU ids for the engines, one engine per id; None: every GPU but the trainer's"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """engine weights and compute; "auto": vLLM's choice for the model and device
    (bfloat16 for a float32 model), but float32 on a CPU without native bfloat16
    (workers/hardware.py). The sync casts the policy to it; float32 makes the engine's
    log-probs match the trainer's exactly on CPU"""
    kvcache_gib: int = 1
    """KV cache per engine on CPU, in GiB (without a bound vLLM takes 92% of the RAM)"""
    max_num_seqs: int = 64
    """sequences an engine batches at once"""
    max_model_len: int = 1024
    """longest prompt + completion, in tokens"""
    hang_timeout_s: float = 60.0
    """an engine with requests in flight that produces nothing for this long is hung"""
    start_timeout_s: float = 300.0
    """longest wait for every engine to start"""
    sync_timeout_s: float = 120.0
    """longest wait for every engine to load new weights"""
    shutdown_timeout_s: float = 30.0
    """longest wait for the workers and engines to stop"""


@dataclasses.dataclass
class GenConfig:
    max_tokens: int = 48
    """most tokens per completion"""
    temperature: float = 1.0
    """sampling temperature; the loss uses the same temperature for the policy's log-probs"""
    top_p: float = 1.0
    """nucleus sampling"""


@dataclasses.dataclass
class TaskConfig:
    name: Literal["arithmetic", "jsonl", "python", "math"] = "arithmetic"
    """"arithmetic": generated sums and differences; "jsonl": prompts and answers from a
    file; "math": math problems from a JSONL or parquet file (GSM8K, MATH), graded by
    math-verify; "python": the object `task.factory` returns"""
    factory: str | None = None
    """for name=python: "module:callable", called with no arguments, returning an object
    with prompt(index) -> trainer.tasks.Prompt and reward(text, prompt) -> float"""
    path: str | None = None
    """the data file, required for name=jsonl (JSONL: one JSON object per line) and
    name=math (.jsonl/.json or .parquet)"""
    prompt_field: str = "prompt"
    """JSONL field holding the user message"""
    answer_field: str = "answer"
    """JSONL field holding the reference answer"""
    max_operand: int = 10
    """arithmetic: operands are drawn from 0..max_operand"""
    overlong: Literal["skip", "error"] = "skip"
    """a prompt whose tokens + gen.max_tokens exceed engine.max_model_len: "skip" it
    (a `prompt_skipped` event, counted in data/prompts_skipped), or "error": a file
    task's overlong row stops the run at start, naming file:line"""


@dataclasses.dataclass
class EvalConfig:
    every: int = 0
    """evaluate the policy every this many steps, and after the last one; 0: never"""
    before_train: bool = False
    """evaluate the initial (or resumed) policy before the first step too"""
    task: TaskConfig | None = None
    """the held-out task, a mapping like the task section (e.g. {name: jsonl, path:
    heldout.jsonl}); null: the training task, with prompts drawn from eval.seed (for
    arithmetic: other problems than training's)"""
    seed: int = 1_000_003
    """seeds the eval task's prompts and every eval request: each evaluation sees the
    same prompts and the same sampling noise, so successive evaluations compare"""
    prompts: int = 64
    """prompts per evaluation: the eval task's first this many"""
    samples: int = 4
    """completions per prompt (k of pass@k and mean@k)"""
    temperature: float = 1.0
    """sampling temperature of the eval completions"""
    max_tokens: int | None = None
    """most tokens per eval completion; null: gen.max_tokens"""
    pass_threshold: float = 1.0
    """a completion passes when its reward is at least this (1.0: the built-in tasks'
    reward for a right answer)"""


@dataclasses.dataclass
class TrainerDeviceConfig:
    device: str = "auto"
    """torch device of the policy: "auto" (cuda:0 if there is a GPU, else cpu), "cpu",
    "cuda" or "cuda:N\""""
    dtype: Literal["auto", "mixed", "float32", "bfloat16", "float16"] = "auto"
    """policy dtype: "mixed": float32 weights and optimizer state, bfloat16 autocast
    compute (log-probs and loss in float32); "auto": mixed where the hardware computes
    bfloat16 natively (GPUs that support it, CPUs with AVX512-BF16 or AMX) and the
    engines generate in bfloat16 (engine.dtype auto or bfloat16), float32 elsewhere
    (beside a float32 engine a mixed trainer's policy drifts from the engine's:
    trainer/policy.py resolve_dtype); a dtype name: the weights and compute in that dtype"""
    ranks: int = 1
    """training processes (torch.distributed, FSDP2: each holds a shard of the policy and
    its optimizer state). 1 trains in the launcher's child process. On GPUs rank r
    trains on GPU r and the engines take the other GPUs; on CPU the ranks use gloo"""
    collective_timeout_s: float = 600.0
    """the longest one collective (gradient reduce, weight gather) may take before the
    run fails; ranks waiting for rank 0's next batch do not count against it"""
    keep_freed_memory: bool = True
    """on a CPU, glibc's malloc keeps the memory the trainer frees for reuse instead of
    handing it back to the kernel (each micro-batch reuses the last one's pages instead
    of faulting them in again; measured in README's Running section); resident memory
    stays at the step's peak. No effect on a GPU or off glibc"""
    share_prompts: bool = True
    """forward each prompt once per micro-batch: the rows of a group (one prompt, many
    completions) attend to the prompt's one set of keys and values instead of each
    forwarding it (the same log-probs and gradients up to float rounding, in less time:
    README's Running section). Off, or with a model whose forward takes no key/value
    cache: every row forwards its whole sequence"""


@dataclasses.dataclass
class RewardFunctionConfig:
    fn: str = "task"
    """"module:callable", or "task": the task's own reward(text, prompt)"""
    name: str | None = None
    """logged as reward/<name>/mean; default: the callable's name ("task" for the task's)"""
    weight: float = 1.0
    """the reward is the weighted sum of the functions' values"""
    group: bool = False
    """called once per group as fn(texts, prompt) -> one number per text (judges,
    ranking); otherwise once per completion as fn(text, prompt) -> number"""


@dataclasses.dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = dataclasses.field(default_factory=list)
    """reward functions, like TRL's reward_funcs / reward_weights: a list of {fn, name,
    weight, group} (or "module:callable" strings); empty: the task's own reward alone.
    `async def` functions work too"""
    executor: Literal["thread", "process"] = "thread"
    """where reward calls run, off the engine's thread: "thread" (a stuck call is
    abandoned, its thread counted) or "process" (spawned processes; a stuck call's
    process is killed; the functions must pickle)"""
    workers: int = 8
    """reward calls running at once"""
    on_error: Literal["fail", "skip"] = "fail"
    """when a reward call still fails after its last attempt (an exception, a timeout, a
    NaN or non-number): fail the run, or skip the group (its permit is returned)"""
    max_attempts: int = 3
    """attempts per reward call on transient errors (TransientRewardError, timeouts)"""
    timeout_s: float = 10.0
    """longest time one reward call may run"""


@dataclasses.dataclass
class LogConfig:
    format: Literal["auto", "json", "console"] = "auto"
    """"auto": console on a terminal, JSON lines otherwise"""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """lowest level logged"""
    trackers: list[Literal["tensorboard", "wandb", "trackio"]] = dataclasses.field(default_factory=list)
    """experiment trackers that get every metrics record (trainer/tracking.py), e.g.
    [tensorboard, wandb]: TensorBoard event files in output_dir/tensorboard; Weights &
    Biases (offline, in output_dir/wandb, unless an API key is set); trackio (its local
    store). Each needs its package: pip install -e ".[track]" """
    project: str = "rl-trainer"
    """the wandb and trackio project"""
    run_name: str | None = None
    """the run's name in wandb and trackio; null: the name of run.output_dir"""


@dataclasses.dataclass
class TrainerConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    gen: GenConfig = dataclasses.field(default_factory=GenConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    trainer: TrainerDeviceConfig = dataclasses.field(default_factory=TrainerDeviceConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | None = None, overrides: Iterable[str] = ()) -> TrainerConfig:
        """Defaults, then the YAML file (if any), then the overrides; validated."""
        cfg = cls.from_yaml(path) if path is not None else cls()
        cfg.apply_overrides(overrides)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str) -> TrainerConfig:
        """Defaults updated from a YAML file of sections (not validated: overrides may
        still complete it; `load` validates)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: invalid YAML: {problem}") from e
        if data is None:  # an empty file: nothing to change
            data = {}
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> TrainerConfig:
        """Defaults updated from {section: {key: value}} (a YAML file, or the resolved
        config saved in a checkpoint). Not validated. Errors start with `source`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        cfg = cls()
        for section, values in data.items():
            if values is not None and not isinstance(values, Mapping):  # `algo:` alone is None
                raise ConfigError(
                    f"{source}: section '{section}' must be a mapping of keys, got {type(values).__name__}",
                    key=str(section),
                )
            try:
                cfg._section(str(section), dotted=str(section))
                for key, value in (values or {}).items():
                    cfg._set(f"{section}.{key}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}", key=e.key) from None
        return cfg

    def apply_overrides(self, overrides: Iterable[str]) -> TrainerConfig:
        """Apply `section.key=value` strings in order; returns self.

        Values are parsed as YAML ("3" -> 3, "[1,2]" -> [1, 2], "null" -> None), then
        type-checked. A string field keeps the text as typed where YAML would read a
        number or a bool ("run.output_dir=2024" is the string "2024")."""
        for item in overrides:
            dotted, sep, text = item.partition("=")
            dotted = dotted.strip()
            if not sep or not dotted:
                raise ConfigError(f"override '{item}': expected section.key=value", key=dotted or None)
            tp = self._field_type(dotted)  # an unknown key fails before its value is parsed
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{dotted}: cannot parse value '{text}' as YAML: {e}", key=dotted) from e
            if isinstance(value, (bool, int, float)) and str in _accepted_types(tp):
                value = text
            self._set(dotted, value)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved config as plain data: for logs and checkpoints."""
        return dataclasses.asdict(self)

    # ---- validation -------------------------------------------------------------------

    def validate(self) -> None:
        """Types (again: code may have assigned fields directly), then range and
        cross-field rules; raises ConfigError naming the key and the rule."""
        for section in dataclasses.fields(self):
            for key in _hints(type(getattr(self, section.name))):
                dotted = f"{section.name}.{key}"
                self._set(dotted, self._get(dotted))
        run, algo, engine, gen, task = self.run, self.algo, self.engine, self.gen, self.task
        rules: list[tuple[str, bool, str]] = [
            ("run.steps", run.steps >= 1, "must be >= 1"),
            ("run.checkpoint_every", run.checkpoint_every >= 1, "must be >= 1"),
            ("run.keep_checkpoints", run.keep_checkpoints >= 1, "must be >= 1"),
            ("run.output_dir", run.output_dir != "", "must not be empty"),
            ("run.resume", run.resume != "", 'must be "auto", "never" or a checkpoint directory'),
            ("run.batch_timeout_s", run.batch_timeout_s > 0, "must be > 0"),
            ("model.path", self.model.path != "", "must not be empty"),
            ("algo.group_size", algo.group_size >= 2, "must be >= 2 (advantages compare samples within a group)"),
            ("algo.groups_per_step", algo.groups_per_step >= 1, "must be >= 1"),
            ("algo.max_staleness", algo.max_staleness == "auto" or algo.max_staleness >= 0, 'must be >= 0 or "auto"'),
            ("algo.lr", algo.lr > 0, "must be > 0"),
            ("algo.lr_warmup_steps", algo.lr_warmup_steps >= 0, "must be >= 0"),
            ("algo.lr_min_ratio", 0 <= algo.lr_min_ratio <= 1, "must be 0 <= lr_min_ratio <= 1"),
            ("algo.clip_low", 0 < algo.clip_low < 1, "must be 0 < clip_low < 1"),
            ("algo.clip_high", algo.clip_high > 0, "must be > 0"),
            ("algo.is_cap", algo.is_cap >= 1, "must be >= 1"),
            ("algo.filter_budget", algo.filter_budget >= 0, "must be >= 0"),
            ("algo.max_grad_norm", algo.max_grad_norm > 0, "must be > 0"),
            ("algo.weight_decay", algo.weight_decay >= 0, "must be >= 0"),
            ("algo.micro_batch_size", algo.micro_batch_size >= 1, "must be >= 1"),
            ("trainer.ranks", self.trainer.ranks >= 1, "must be >= 1"),
            ("trainer.collective_timeout_s", self.trainer.collective_timeout_s > 0, "must be > 0"),
            ("engine.count", engine.count >= 1, "must be >= 1"),
            (
                "engine.devices",
                engine.devices is None
                or (engine.devices != [] and min(engine.devices) >= 0 and len(set(engine.devices)) == len(engine.devices)),
                "must be null, or a non-empty list of distinct GPU ids >= 0",
            ),
            ("engine.kvcache_gib", engine.kvcache_gib >= 1, "must be >= 1 (vLLM takes whole GiB)"),
            ("engine.max_num_seqs", engine.max_num_seqs >= 1, "must be >= 1"),
            ("engine.max_model_len", engine.max_model_len >= 2, "must be >= 2"),
            ("engine.hang_timeout_s", engine.hang_timeout_s > 0, "must be > 0"),
            ("engine.start_timeout_s", engine.start_timeout_s > 0, "must be > 0"),
            ("engine.sync_timeout_s", engine.sync_timeout_s > 0, "must be > 0"),
            ("engine.shutdown_timeout_s", engine.shutdown_timeout_s > 0, "must be > 0"),
            ("gen.max_tokens", gen.max_tokens >= 1, "must be >= 1"),
            (
                "gen.max_tokens",
                gen.max_tokens < engine.max_model_len,
                f"must be < engine.max_model_len ({engine.max_model_len}), leaving room for the prompt",
            ),
            ("gen.temperature", gen.temperature > 0, "must be > 0"),
            ("gen.top_p", 0 < gen.top_p <= 1, "must be 0 < top_p <= 1"),
            (
                "task.path",
                task.name not in ("jsonl", "math") or bool(task.path),
                "is required when task.name is jsonl or math",
            ),
            (
                "task.factory",
                task.name != "python" or re.fullmatch(r"[\w.]+:[\w.]+", task.factory or "") is not None,
                'is required when task.name is python, as "module:callable"',
            ),
            ("task.prompt_field", task.prompt_field != "", "must not be empty"),
            ("task.answer_field", task.answer_field != "", "must not be empty"),
            ("task.max_operand", task.max_operand >= 1, "must be >= 1"),
            (
                "trainer.device",
                re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.trainer.device) is not None,
                'must be "auto", "cpu", "cuda" or "cuda:N"',
            ),
            ("reward.max_attempts", self.reward.max_attempts >= 1, "must be >= 1"),
            ("reward.timeout_s", self.reward.timeout_s > 0, "must be > 0"),
            ("reward.workers", self.reward.workers >= 1, "must be >= 1"),
            ("algo.max_nonfinite_steps", algo.max_nonfinite_steps >= 1, "must be >= 1"),
            ("algo.kl_coef", algo.kl_coef >= 0, "must be >= 0"),
            ("log.trackers", len(set(self.log.trackers)) == len(self.log.trackers), "must not name a tracker twice"),
            ("log.project", self.log.project.strip() != "", "must not be empty"),
            ("log.run_name", self.log.run_name is None or self.log.run_name.strip() != "", "must be null or not empty"),
        ]
        names = []
        for i, f in enumerate(self.reward.functions):
            names.append(f.name or f.fn.rpartition(":")[2].rpartition(".")[2])
            rules += [
                (
                    f"reward.functions[{i}].fn",
                    f.fn == "task" or re.fullmatch(r"[\w.]+:[\w.]+", f.fn) is not None,
                    'must be "module:callable" or "task"',
                ),
                (
                    f"reward.functions[{i}].name",
                    names[-1] not in names[:-1],
                    f"must be unique among reward.functions (two are called {names[-1]!r}; set name)",
                ),
            ]
        ev = self.eval
        rules += [
            ("eval.every", ev.every >= 0, "must be >= 0 (0: never)"),
            ("eval.prompts", ev.prompts >= 1, "must be >= 1"),
            ("eval.samples", ev.samples >= 1, "must be >= 1"),
            ("eval.temperature", ev.temperature > 0, "must be > 0"),
            ("eval.max_tokens", ev.max_tokens is None or 1 <= ev.max_tokens < engine.max_model_len,
             f"must be null or 1 <= max_tokens < engine.max_model_len ({engine.max_model_len})"),
            ("run.keep_best", run.keep_best is None or run.keep_best in KEEP_BEST_METRICS,
             f"must be null or one of {', '.join(KEEP_BEST_METRICS)}"),
            ("eval.every", run.keep_best is None or ev.every > 0, "must be > 0 when run.keep_best is set"),
        ]
        if ev.task is not None:
            t = ev.task
            rules += [
                ("eval.task.path", t.name not in ("jsonl", "math") or bool(t.path),
                 "is required when eval.task.name is jsonl or math"),
                ("eval.task.factory",
                 t.name != "python" or re.fullmatch(r"[\w.]+:[\w.]+", t.factory or "") is not None,
                 'is required when eval.task.name is python, as "module:callable"'),
            ]
        for key, ok, rule in rules:
            if not ok:
                value = self._get_item(key) if "[" in key else self._get(key) if key.count(".") == 1 else self._get_nested(key)
                raise ConfigError(f"{key}: {rule}, got {value!r}", key=key)

    # ---- helpers ----------------------------------------------------------------------

    def _section(self, name: str, dotted: str) -> Any:
        """The section dataclass called `name`; `dotted` is the key being set, for errors."""
        sections = [f.name for f in dataclasses.fields(self)]
        if name not in sections:
            raise ConfigError(
                f"unknown config section '{name}' in '{dotted}'{_did_you_mean(name, sections)}. "
                f"Valid sections: {', '.join(sections)}",
                key=dotted,
            )
        return getattr(self, name)

    def _field_type(self, dotted: str) -> Any:
        """The annotation of `section.key`; raises ConfigError for an unknown key."""
        section_name, dot, key = dotted.partition(".")
        if not dot:
            sections = [f.name for f in dataclasses.fields(self)]
            owners = [f"{s}.{dotted}" for s in sections if dotted in _hints(type(getattr(self, s)))]
            hint = f" (did you mean {' or '.join(repr(o) for o in owners)}?)" if owners else ""
            raise ConfigError(f"config key '{dotted}' must be section.key{hint}", key=dotted)
        hints = _hints(type(self._section(section_name, dotted)))
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{dotted}'{_did_you_mean(key, list(hints), prefix=section_name + '.')}. "
                f"Valid keys in [{section_name}]: {', '.join(hints)}",
                key=dotted,
            )
        return hints[key]

    def _set(self, dotted: str, value: Any) -> None:
        tp = self._field_type(dotted)
        section_name, _, key = dotted.partition(".")
        setattr(getattr(self, section_name), key, _coerce(value, tp, dotted))

    def _get_item(self, dotted: str) -> Any:
        """The value of `section.key[i].field`."""
        m = re.fullmatch(r"(\w+\.\w+)\[(\d+)\]\.(\w+)", dotted)
        return getattr(self._get(m[1])[int(m[2])], m[3])

    def _get_nested(self, dotted: str) -> Any:
        """The value of `section.key.field` (a dataclass-valued key, e.g. eval.task.path)."""
        section, key, field = dotted.split(".")
        return getattr(self._get(f"{section}.{key}"), field)

    def _get(self, dotted: str) -> Any:
        section_name, _, key = dotted.partition(".")
        return getattr(getattr(self, section_name), key)


def _hints(section_cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _accepted_types(tp: Any) -> tuple[Any, ...]:
    """The members of `X | None`, or (tp,) for a plain annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as the annotation `tp` asks, or ConfigError naming key, type and value.

    Supported annotations: bool, int, float, str, Literal[...], list[X], unions of these
    (X | None, int | Literal["auto"]: the first member that takes the value), and a
    dataclass (a mapping of its fields)."""

    def wrong() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key=key)

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) and isinstance(value, Mapping):
            return _coerce(value, inner[0], key)  # its own errors name the field
        for member in inner:  # the first member that takes the value
            try:
                return _coerce(value, member, key)
            except ConfigError:
                pass
        raise wrong()
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise wrong()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (inner,) = typing.get_args(tp)
        if dataclasses.is_dataclass(inner):  # its own errors name the item and field
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        try:
            return [_coerce(v, inner, key) for v in value]
        except ConfigError:
            raise wrong() from None
    if dataclasses.is_dataclass(tp):
        # A mapping of its fields; a string sets the first field ("module:callable").
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if isinstance(value, str):
            value = {dataclasses.fields(tp)[0].name: value}
        if not isinstance(value, Mapping):
            raise wrong()
        hints = _hints(tp)
        item = tp()
        for field, v in value.items():
            if field not in hints:
                raise ConfigError(
                    f"{key}: unknown field '{field}'{_did_you_mean(str(field), list(hints))}. "
                    f"Valid fields: {', '.join(hints)}",
                    key=f"{key}.{field}",
                )
            setattr(item, field, _coerce(v, hints[field], f"{key}.{field}"))
        return item
    # bool is an int subclass: check it first, and never accept it as a number.
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string: parse it here.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"{key}: config.py cannot check the annotation {tp!r}")  # a bug in this file
