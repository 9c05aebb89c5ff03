"""One optimizer step of the Trainer on fixed groups, among however many ranks this
process was started with (python, or torch.distributed.run for several): rank 0 writes
the weights after the step to argv[1]. tests/test_ranks.py compares 1 rank with 2."""

import json
import os
import random
import sys
import types

import safetensors.torch

from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.models import resolve_model_path
from trainer.policy import TokenBatch
from trainer.trainer import Trainer
from workers.worker import RolloutGroup

G = 4
LR = 1e-4
WARMUP = 4  # the step (step 0) trains at LR / WARMUP: every rank must apply the schedule


def fixed_groups() -> list[RolloutGroup]:
    """Five groups of varied lengths; one with no reward spread (no learning signal)."""
    rng = random.Random(0)
    groups = []
    for i in range(5):
        completions = [[rng.randrange(100, 5000) for _ in range(rng.randrange(1, 12))] for _ in range(G)]
        groups.append(RolloutGroup(
            prompt_index=i,
            prompt_token_ids=[rng.randrange(100, 5000) for _ in range(rng.randrange(2, 9))],
            completion_token_ids=completions,
            behaviour_logprobs=[[-rng.uniform(5, 12) for _ in c] for c in completions],
            texts=[""] * G,
            finish_reasons=["stop"] * G,
            rewards=[0.5] * G if i == 2 else [rng.random() for _ in range(G)],
            reward_terms={},
            start_version=0, weight_versions=(0, 0), worker="gen-0", engine=0, gen_s=0.0,
        ))
    return groups


def main(out: str) -> None:
    cfg = TrainerConfig.load(None, [
        "model.path=tiny", "trainer.dtype=float32", f"algo.group_size={G}", "algo.groups_per_step=5",
        "algo.micro_batch_size=3", f"algo.lr={LR}", f"algo.lr_warmup_steps={WARMUP}", "gen.temperature=1.0",
        f"trainer.ranks={os.environ.get('WORLD_SIZE', 1)}",
    ])
    trainer = Trainer(cfg)
    trainer.model_path = resolve_model_path(cfg.model.path)
    trainer._setup_policy()
    if trainer.rank != 0:
        trainer._follow()
        return
    trainer.queue = types.SimpleNamespace(version=0)
    shared = []  # per micro-batch of rank 0: whether its rows shared their prompts' forward
    build = TokenBatch.build

    def recording_build(*args, **kwargs):
        batch = build(*args, **kwargs)
        shared.append(batch.prompts is not None)
        return batch

    TokenBatch.build = recording_build
    stats = {**trainer._train_on(fixed_groups()), "shared": shared}
    trainer.ranks.send("model")
    weights = ckpt.full_weights(trainer.policy)
    trainer.ranks.send("stop", {"exit_code": 0})
    safetensors.torch.save_file(weights, out, metadata={"stats": json.dumps(stats)})


if __name__ == "__main__":
    main(sys.argv[1])
