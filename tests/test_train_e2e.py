"""End to end: real training steps with the tiny model and real vLLM engines on CPU."""

import os
import stat

import pytest
import torch
from structlog.testing import capture_logs

from trainer import Trainer, TrainerConfig
from trainer import metrics as M
from tests.helpers import LetterTask, alive, run_threads
from trainer.models import load_policy
from trainer.policy import TokenBatch

pytestmark = pytest.mark.engine


def tiny_config(tmp_path, model_path, *overrides):
    return TrainerConfig.load(
        None,
        [
            f"model.path={model_path}",
            f"run.output_dir={tmp_path / 'run'}",
            "algo.group_size=4",
            "algo.groups_per_step=2",
            "algo.lr=1e-2",  # large, so one step visibly changes the policy
            "gen.max_tokens=12",
            "engine.max_model_len=128",
            "engine.max_num_seqs=16",
            # Exact log-prob agreement with the policy: trainer.dtype=auto is float32
            # beside a float32 engine, even on a CPU that computes bfloat16.
            "engine.dtype=float32",
            *overrides,
        ],
    )


def fit_recording_engine_pids(trainer):
    """trainer.fit(), and the engine processes' PIDs as training starts."""
    pids = []
    train = trainer.train

    def train_and_record():
        pids.extend(pid for w in trainer.supervisor.workers for pid in w.engine.process_pids())
        return train()

    trainer.train = train_and_record
    return trainer.fit(), pids


def test_three_steps_train_sync_and_drain(tmp_path, tiny_model_path, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_path, "run.steps=3", "algo.max_staleness=0")
    trainer = Trainer(cfg, task=LetterTask())
    shared = []  # per micro-batch: whether rows shared their prompt's forward (trainer.share_prompts)
    build = TokenBatch.build

    def recording_build(*args, **kwargs):
        batch = build(*args, **kwargs)
        shared.append(batch.prompts is not None)
        return batch

    monkeypatch.setattr(TokenBatch, "build", staticmethod(recording_build))
    history, pids = fit_recording_engine_pids(trainer)

    assert (trainer.dtype, trainer.autocast) == (torch.float32, None)
    assert [h[M.STEP] for h in history] == [0, 1, 2]
    assert [h[M.POLICY_VERSION] for h in history] == [1, 2, 3]
    # The policy moved away from the initial weights.
    initial, _ = load_policy(tiny_model_path)
    changed = [
        name
        for (name, p0), (_, p1) in zip(initial.named_parameters(), trainer.policy.named_parameters())
        if not torch.equal(p0, p1)
    ]
    assert len(changed) > 0
    # Synchronous (max_staleness=0): every group was sampled entirely by the weights the
    # trainer held at that step, so the engine's log-probs match the trainer's. At steps
    # 1 and 2 that holds only if the engine received the trained weights.
    # The trainer's log-probs come from forwarding each group's prompt once.
    for h in history:
        assert h[M.STALENESS_MAX] == 0
        assert h[M.SYNC_LOGPROB_MAX_DIFF] < 1e-3, h
    assert shared and all(shared), shared
    # ...and training moved the log-probs by far more than that tolerance.
    seq = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        before = torch.log_softmax(initial(input_ids=seq).logits, -1)
        after = torch.log_softmax(trainer.policy(input_ids=seq).logits, -1)
    assert (before - after).abs().max().item() > 1e-1
    assert history[-1][M.LOSS_GRAD_NORM] > 0
    assert [h[M.OPTIM_LR] for h in history] == [1e-2] * 3  # algo.lr_schedule=constant
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2]
    # Each step's weights reached the engine but the last one's: with no evaluation after
    # it, nothing would generate from them (the engine stopped when the batch was taken).
    assert [w.stats["weight_loads"] for w in trainer.supervisor.workers] == [2]
    assert [w.weight_version for w in trainer.supervisor.workers] == [2]
    assert [h[M.PERF_WEIGHT_SYNC_S] > 0 for h in history] == [True, True, False]
    # The training work: every completion of a group with reward spread (LetterTask's
    # rewards are fractions, so none sits exactly at its group's mean), with its prompt.
    for h in history:
        assert h[M.PERF_TRAIN_ROWS] == round(8 * (1 - h[M.REWARD_FRAC_ZERO_STD_GROUPS])), h
        assert h[M.PERF_TRAIN_TOKENS] > h[M.PERF_TRAIN_ROWS] * 5  # prompts are longer than 5 tokens
        assert h[M.PERF_TRAIN_TOKENS_PER_S] == pytest.approx(h[M.PERF_TRAIN_TOKENS] / h[M.PERF_TRAIN_S])
    assert sum(h[M.PERF_TRAIN_ROWS] for h in history) > 0
    c = trainer.final_counters
    assert c.consumed == c.retired == 6 and c.free == c.permits
    assert run_threads() == []
    assert pids and len(pids) >= 1
    assert alive(pids) == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # RUN_DIR/model loads as a Hugging Face model with the trained weights, written once:
    # its weights file is the final checkpoint's.
    model_dir = tmp_path / "run" / "model"
    final, _ = load_policy(model_dir)
    for (name, p), (_, q) in zip(final.named_parameters(), trainer.policy.named_parameters()):
        assert torch.equal(p, q), name
    assert (model_dir / "model.safetensors").stat().st_ino == (trainer.last_checkpoint / "model.safetensors").stat().st_ino
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [tmp_path / "run" / "model" / "model.safetensors", *(tmp_path / "run" / "checkpoints").glob("step-*/*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path  # not safetensors' 0600


def test_two_engines_generate_get_every_version_evaluate_and_track(tmp_path, tiny_model_path):
    cfg = tiny_config(
        tmp_path, tiny_model_path, "run.steps=2", "engine.count=2", "algo.max_staleness=1",
        "eval.every=1", "eval.before_train=true", "eval.prompts=6", "eval.samples=3", "eval.pass_threshold=0.2",
        "log.trackers=[tensorboard]",
    )
    trainer = Trainer(cfg, task=LetterTask())
    history, pids = fit_recording_engine_pids(trainer)

    assert [h[M.POLICY_VERSION] for h in history] == [1, 2]
    workers = trainer.supervisor.workers
    assert [w.name for w in workers] == ["gen-0", "gen-1"]
    for w in workers:
        assert w.stats["groups"] > 0, w.stats
        assert w.stats["weight_loads"] == 2
        assert w.weight_version == 2
        assert w.stats["eval_prompts"] == 3 * 3  # each engine half of the 6 prompts, 3 evaluations
    for h in history:
        assert h[M.STALENESS_MAX] <= 1
    # Evaluated before training and after each step, on the weights of that step.
    assert [(e[M.STEP], e[M.POLICY_VERSION]) for e in trainer.evals] == [(0, 0), (1, 1), (2, 2)]
    for e in trainer.evals:
        assert e[M.EVAL_PROMPTS] == 6 and e[M.EVAL_K] == 3
        assert 0 <= e[M.EVAL_PASS_AT_1] <= e[M.EVAL_PASS_AT_K] <= 1
        assert 0 <= e[M.EVAL_REWARD_MEAN] <= 1 and 0 < e[M.EVAL_COMPLETION_LEN] <= 12
        assert e[M.PERF_EVAL_S] > 0
    # Evaluations take no permit: the counters balance with the training groups alone.
    c = trainer.final_counters
    assert c.free == c.permits and c.consumed == c.retired == 2 * 2
    # Both kinds of record reached the tracker, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars(M.REWARD_MEAN)] == [
        (h[M.STEP], round(h[M.REWARD_MEAN], 5)) for h in history
    ]
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars(M.EVAL_PASS_AT_1)] == [
        (e[M.STEP], round(e[M.EVAL_PASS_AT_1], 5)) for e in trainer.evals
    ]
    assert run_threads() == []
    assert len(set(pids)) >= 2
    assert alive(pids) == []


@pytest.mark.parametrize(
    "variant",
    [
        # Dr.GRPO with GSPO's sequence ratio and an entropy bonus, a mixed-precision
        # trainer beside the float32 engine (it warns).
        ["algo.loss_agg=seq_mean_token_sum_norm", "algo.scale_rewards=none", "algo.ratio_level=sequence",
         "algo.clip_low=3e-4", "algo.clip_high=4e-4", "algo.entropy_coef=0.01", "trainer.dtype=mixed"],
        # The GRPO paper's aggregation with batch-scaled advantages, a KL penalty to the
        # initial policy, no dynamic sampling (on by default), and the decoupled clip.
        ["algo.loss_agg=seq_mean_token_mean", "algo.scale_rewards=batch", "algo.kl_coef=0.1",
         "algo.kl_estimator=k3", "algo.filter_zero_std=false", "algo.clip_against=proximal"],
    ],
    ids=["drgrpo_gspo_entropy", "grpo_batch_kl_nofilter"],
)
def test_loss_variants_train_with_the_real_engine(tmp_path, tiny_model_path, variant):
    trainer = Trainer(tiny_config(tmp_path, tiny_model_path, "run.steps=2", *variant), task=LetterTask())
    initial = {k: v.clone() for k, v in trainer_weights(tiny_model_path).items()}
    with capture_logs() as logs:
        history = trainer.fit()
    assert [h[M.STEP] for h in history] == [0, 1]
    differ = [e for e in logs if e["event"] == "trainer_engine_numerics_differ"]
    if "trainer.dtype=mixed" in variant:
        assert [(e["autocast"], e["engine_dtype"]) for e in differ] == [("torch.bfloat16", "torch.float32")]
    else:
        assert differ == [] and trainer.autocast is None
    for h in history:
        assert h[M.LOSS_NONFINITE_SKIPPED] == 0 and h[M.LOSS_ENTROPY] > 0 and h[M.LOSS_GRAD_NORM] > 0, h
    moved = [k for k, p in trainer.policy.named_parameters() if not torch.equal(initial[k], p.detach())]
    assert moved
    if "algo.clip_against=proximal" in variant:  # the step's own change is 1 when its loss is taken
        assert all(h[M.LOSS_CLIP_FRAC] == 0 and h[M.MISMATCH_IS_RATIO_MAX] > 0 for h in history), history
    if "algo.kl_coef=0.1" in variant:  # policy == reference at step 0; apart after a step
        assert abs(history[0][M.LOSS_KL_REF]) < 1e-4 < history[1][M.LOSS_KL_REF]
        assert all(h[M.REWARD_FILTERED_GROUPS] >= 0 and h[M.REWARD_FRAC_ZERO_STD_GROUPS] == 0 for h in history)
    assert run_threads() == []


def trainer_weights(model_path):
    model, _ = load_policy(model_path)
    return dict(model.named_parameters())


def test_mask_truncated_leaves_cut_off_completions_out(tmp_path, tiny_model_path):
    # The random tiny model never stops by itself: every completion is cut off at
    # gen.max_tokens, so with mask_truncated nothing is in the loss and nothing moves.
    trainer = Trainer(
        tiny_config(tmp_path, tiny_model_path, "run.steps=1", "algo.mask_truncated=true"), task=LetterTask()
    )
    initial = {k: v.clone() for k, v in trainer_weights(tiny_model_path).items()}
    history = trainer.fit()
    for h in history:
        assert h[M.COMPLETION_CLIPPED_FRAC] == 1.0
        assert h[M.LOSS_ENTROPY] is None and h[M.LOSS_GRAD_NORM] == 0.0 and h[M.LOSS_POLICY] == 0.0, h
    assert all(torch.equal(initial[k], p.detach()) for k, p in trainer.policy.named_parameters())
