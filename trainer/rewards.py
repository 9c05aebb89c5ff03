"""The reward functions of a run: reward.functions resolved to callables.

Empty reward.functions: the task's own `reward(text, prompt)`, alone, named "task".
Otherwise each entry is "module:callable" (or "task") with a weight and a name; the
reward of a completion is the weighted sum. Where they run (a bounded pool, a timeout
per call) is workers/rewards.py.
"""

from __future__ import annotations

import importlib
import operator
from typing import Any

from trainer.config import RewardConfig
from trainer.errors import ConfigError
from workers.rewards import RewardFunction, RewardSpec


def build_reward_functions(reward_cfg: RewardConfig, task: Any) -> list[RewardFunction]:
    entries = reward_cfg.functions
    if not entries:
        return [RewardFunction("task", task.reward)]
    functions = []
    for i, entry in enumerate(entries):
        key = f"reward.functions[{i}].fn"
        if entry.fn == "task":
            fn, default_name = task.reward, "task"
        else:
            module, _, attr = entry.fn.partition(":")
            try:
                fn = operator.attrgetter(attr)(importlib.import_module(module))
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{key}: cannot load {entry.fn!r}: {e}", key=key) from e
            if not callable(fn):
                raise ConfigError(f"{key}: {entry.fn!r} is not callable", key=key)
            default_name = attr.rpartition(".")[2]
        functions.append(RewardFunction(entry.name or default_name, fn, entry.weight, entry.group))
    return functions


def reward_spec(reward_cfg: RewardConfig, task: Any) -> RewardSpec:
    return RewardSpec(
        functions=build_reward_functions(reward_cfg, task),
        executor=reward_cfg.executor,
        workers=reward_cfg.workers,
        timeout_s=reward_cfg.timeout_s,
        max_attempts=reward_cfg.max_attempts,
        on_error=reward_cfg.on_error,
    )
