"""Training across ranks without an engine: two gloo ranks with FSDP2 shards take the
same optimizer step as one rank, and the rank plumbing's pieces."""

import json
import os
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch

from tests.faults import REPO
from tests.ranks_step import LR, WARMUP
from trainer.config import TrainerConfig
from trainer.errors import ConfigError
from trainer.ranks import check_layout, split_by_tokens


def run_step(tmp_path, ranks: int) -> tuple[dict, dict]:
    out = tmp_path / f"weights-{ranks}.safetensors"
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([*launcher, "-m", "tests.ranks_step", str(out)], check=True, cwd=REPO, env=env, timeout=300)
    with safetensors.safe_open(str(out), "pt") as f:
        stats = json.loads(f.metadata()["stats"])
    return safetensors.torch.load_file(str(out)), stats


def test_two_ranks_take_the_same_optimizer_step_as_one(tmp_path):
    one, one_stats = run_step(tmp_path, 1)
    two, two_stats = run_step(tmp_path, 2)
    assert set(one) == set(two)
    from trainer.models import load_policy, resolve_model_path

    before = dict(load_policy(resolve_model_path("tiny"))[0].named_parameters())
    moved = max((one[k] - before[k].detach()).abs().max().item() for k in one)
    # The step changed the weights, at the warm-up's learning rate: AdamW's first step
    # moves a weight by lr * g / (|g| + eps), at most lr (give or take float32's rounding
    # of weights near 1: 0.13% of this lr was seen) ...
    lr = LR / WARMUP
    assert one_stats["optim/lr"] == two_stats["optim/lr"] == pytest.approx(lr)
    assert lr * 0.99 < moved < lr * 1.01
    # ... the same way with two ranks (a rank that missed the schedule would step its
    # shard by LR). AdamW's first step is lr * g / (|g| + eps): where a
    # gradient is about as small as eps (1e-8), the rounding that differs with the order
    # of the reduction moves that weight's step by a fraction of lr (seen on an AVX512
    # CPU: 4 weights of the tiny model's 6.6M, the largest by 0.11 lr). Everywhere else
    # the steps agree to 1e-6; a rank's gradient lost or counted twice moves most weights.
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert int((diff > 1e-6).sum()) <= 1e-5 * diff.numel(), int((diff > 1e-6).sum())
    assert diff.max().item() < 0.5 * lr, diff.max().item()
    for key in ("loss/policy", "loss/grad_norm", "loss/entropy", "loss/clip_frac", "loss/is_ratio_max"):
        assert two_stats[key] == pytest.approx(one_stats[key], rel=1e-4, abs=1e-6), key
    # Both forwarded each prompt once per micro-batch (trainer.share_prompts): one rank
    # where a prompt repeats, two ranks in every micro-batch, so that their collectives match.
    assert any(one_stats["shared"]) and two_stats["shared"] and all(two_stats["shared"]), (one_stats, two_stats)


def test_rows_are_split_by_tokens():
    parts = split_by_tokens([10, 1, 1, 9, 2, 3], 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    loads = [sum([10, 1, 1, 9, 2, 3][i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 1
    assert split_by_tokens([5], 2) == [[0], []]


@pytest.mark.parametrize(
    "overrides, gpus, key",
    [
        (["trainer.ranks=2", "trainer.device=cuda"], 0, "trainer.device"),
        (["trainer.ranks=4"], 2, "trainer.ranks"),
        (["trainer.ranks=2"], 2, "trainer.ranks"),  # no GPU left for the engines
        (["trainer.ranks=2", "engine.devices=[1,2]"], 4, "engine.devices"),  # GPU 1 is rank 1's
        (["trainer.ranks=2", "trainer.device=cuda:1"], 4, "trainer.device"),
    ],
)
def test_a_device_layout_that_cannot_work_is_a_config_error_naming_the_key(overrides, gpus, key):
    cfg = TrainerConfig.load(None, overrides)
    with pytest.raises(ConfigError) as e:
        check_layout(cfg, gpus)
    assert e.value.key == key


def test_layouts_that_fit():
    check_layout(TrainerConfig.load(None, ["trainer.ranks=2"]), 0)  # CPU: gloo
    check_layout(TrainerConfig.load(None, ["trainer.ranks=2"]), 3)  # GPUs 0-1 train, 2 generates
    check_layout(TrainerConfig.load(None, ["trainer.ranks=2", "engine.devices=[3]"]), 4)
    check_layout(TrainerConfig.load(None, ["trainer.ranks=1"]), 1)  # one GPU, shared as before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_ranks_on_gpus_take_the_same_step_as_one(tmp_path):
    """The GPU path (NCCL, a GPU per rank): the same comparison."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    test_two_ranks_take_the_same_optimizer_step_as_one(tmp_path)
