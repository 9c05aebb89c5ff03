"""The main thread of the RL trainer: config, tasks, policy, GRPO loss, the loop.

    from trainer import Trainer, TrainerConfig
    history = Trainer(TrainerConfig.load(None, ["model.path=tiny", "run.steps=3"])).fit()
"""

from trainer.config import TrainerConfig

__all__ = ["Trainer", "TrainerConfig"]


def __getattr__(name):
    # Trainer pulls in vLLM (seconds to import): only when asked for, so that config,
    # tasks and errors stay light to import.
    if name == "Trainer":
        from trainer.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
