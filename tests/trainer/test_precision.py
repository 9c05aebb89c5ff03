"""Training at the hardware's speed, numerically safe: trainer.dtype (mixed = float32
weights, bfloat16 autocast), micro-batches padded to their own length, and the
rollout/training mismatch metrics. The real tiny model, no engine: the trainer's
optimizer step is called directly."""

import math

import pytest
import torch

import trainer.policy as policy_mod
from workers import hardware
from trainer import Trainer, TrainerConfig
from trainer import metrics as M
from trainer.loss import LossNorm
from trainer.policy import TokenBatch, forwarded_tokens, micro_batch_order, resolve_dtype, token_logprobs


def test_trainer_dtype_resolves_to_weights_and_autocast(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("mixed", cpu) == (torch.float32, torch.bfloat16)
    assert resolve_dtype("float32", cpu) == (torch.float32, None)
    assert resolve_dtype("bfloat16", cpu) == (torch.bfloat16, None)
    monkeypatch.setattr(policy_mod, "bf16_native", lambda device: True)
    assert resolve_dtype("auto", cpu) == (torch.float32, torch.bfloat16)
    assert resolve_dtype("auto", cpu, "bfloat16") == (torch.float32, torch.bfloat16)
    # Beside an engine that does not generate in bfloat16 "auto" is float32 (a mixed
    # trainer's policy drifts from a float32 engine's); asked for, mixed is kept.
    assert resolve_dtype("auto", cpu, "float32") == (torch.float32, None)
    assert resolve_dtype("auto", cpu, "float16") == (torch.float32, None)
    assert resolve_dtype("mixed", cpu, "float32") == (torch.float32, torch.bfloat16)
    monkeypatch.setattr(policy_mod, "bf16_native", lambda device: False)
    assert resolve_dtype("auto", cpu) == (torch.float32, None)
    assert resolve_dtype("auto", cpu, "bfloat16") == (torch.float32, None)


def test_engine_dtype_auto_is_float32_on_a_cpu_that_emulates_bfloat16(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_native", lambda device: False)
    assert hardware.engine_dtype("auto", on_cpu=True) == "float32"
    assert hardware.engine_dtype("auto", on_cpu=False) == "auto"  # a GPU: vLLM's choice
    assert hardware.engine_dtype("bfloat16", on_cpu=True) == "bfloat16"  # asked for: kept
    monkeypatch.setattr(hardware, "bf16_native", lambda device: True)
    assert hardware.engine_dtype("auto", on_cpu=True) == "auto"


def trainer_without_engines(tmp_path, tiny_model_path, *overrides):
    cfg = TrainerConfig.load(None, [f"model.path={tiny_model_path}", f"run.output_dir={tmp_path}", *overrides])
    t = Trainer(cfg)
    from trainer.models import resolve_model_path

    t.model_path = resolve_model_path(cfg.model.path)
    t._setup_policy()
    return t


# Rows of very different lengths: prompt + completion of 3 .. 40 tokens.
LENGTHS = [(2, 1), (10, 30), (3, 4), (20, 20), (5, 5), (2, 2)]


def rows_for(t, offset=0.0):
    """Rows whose behaviour log-probs are the policy's own minus `offset`."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (p, c) in enumerate(LENGTHS):
        ids = torch.randint(5, 200, (p + c,), generator=g).tolist()
        batch = TokenBatch.build([ids[:p]], [ids[p:]], [[0.0] * c], pad_id=t.pad_id, device="cpu")
        with torch.no_grad():
            lp, _ = token_logprobs(t.policy, batch, 1.0, with_entropy=False, autocast=t.autocast)
        behaviour = (lp[0, p - 1 : p - 1 + c] - offset).tolist()
        rows.append({"prompt": ids[:p], "completion": ids[p:], "behaviour": behaviour, "in_loss": True,
                     "on_policy": True, "advantage": 1.0 if i % 2 else -1.0})
    return rows


def grads_after_step(t, rows, micro_batch_size, monkeypatch):
    """The gradients of one step with `micro_batch_size`, and the (rows, width) of each
    micro-batch built (the optimizer itself does not step)."""
    t.cfg.algo.micro_batch_size = micro_batch_size
    built = []
    real_build = TokenBatch.build

    def build(prompts, completions, *args, **kwargs):
        b = real_build(prompts, completions, *args, **kwargs)
        built.append((len(prompts), b.input_ids.shape[1], max(len(p) + len(c) for p, c in zip(prompts, completions))))
        return b

    monkeypatch.setattr(TokenBatch, "build", staticmethod(build))
    monkeypatch.setattr(t.optimizer, "step", lambda: None)
    norm = LossNorm(tokens=sum(c for _, c in LENGTHS), seqs=len(LENGTHS), max_tokens=48)
    stats = t._optimizer_step(rows, norm, micro_batches=-(-len(rows) // micro_batch_size))
    monkeypatch.undo()
    return {n: p.grad.clone() for n, p in t.policy.named_parameters()}, built, stats


def test_micro_batches_are_padded_to_their_own_length_and_sum_to_the_same_gradient(
    tmp_path, tiny_model_path, monkeypatch
):
    t = trainer_without_engines(tmp_path, tiny_model_path, "trainer.dtype=float32")
    rows = rows_for(t)
    one, built_one, _ = grads_after_step(t, rows, 8, monkeypatch)
    pairs, built_pairs, _ = grads_after_step(t, rows, 2, monkeypatch)
    assert [(n, w) for n, w, _ in built_one] == [(6, 40)]
    # Sorted by length, longest first: (40, 40) (10, 8) (4, 3), each as wide as its longest.
    assert [(n, w) for n, w, _ in built_pairs] == [(2, 40), (2, 10), (2, 4)]
    assert all(w == longest for _, w, longest in built_pairs)
    for name in one:
        torch.testing.assert_close(pairs[name], one[name], rtol=1e-4, atol=1e-6)


def test_mismatch_metrics_measure_the_trainer_engine_log_prob_gap(tmp_path, tiny_model_path, monkeypatch):
    t = trainer_without_engines(tmp_path, tiny_model_path, "trainer.dtype=float32")
    _, _, stats = grads_after_step(t, rows_for(t, offset=0.1), 2, monkeypatch)  # engine 0.1 nats below
    assert stats[M.MISMATCH_LOGPROB_DIFF_MEAN] == pytest.approx(0.1, abs=1e-4)
    assert stats[M.MISMATCH_LOGPROB_DIFF_MAX] == pytest.approx(0.1, abs=1e-4)
    for name in (M.MISMATCH_IS_RATIO_MEAN, M.MISMATCH_IS_RATIO_MIN, M.MISMATCH_IS_RATIO_MAX):
        assert stats[name] == pytest.approx(math.exp(0.1), abs=1e-4)
    assert stats[M.SYNC_LOGPROB_MAX_DIFF] == pytest.approx(0.1, abs=1e-4)
    # Exact behaviour log-probs: no gap.
    _, _, exact = grads_after_step(t, rows_for(t), 2, monkeypatch)
    assert exact[M.MISMATCH_LOGPROB_DIFF_MAX] < 1e-5 and exact[M.MISMATCH_IS_RATIO_MIN] == pytest.approx(1.0, abs=1e-5)


def test_mixed_precision_keeps_float32_weights_and_log_probs_close_to_float32(tmp_path, tiny_model_path, monkeypatch):
    mixed = trainer_without_engines(tmp_path, tiny_model_path, "trainer.dtype=mixed")
    assert mixed.autocast is torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mixed.policy.parameters())
    rows = rows_for(mixed)  # behaviour: the mixed policy's own log-probs
    # The float32 policy's log-probs of the same tokens differ by bfloat16 rounding only.
    full = trainer_without_engines(tmp_path, tiny_model_path, "trainer.dtype=float32")
    _, _, stats = grads_after_step(full, rows, 8, monkeypatch)
    assert 0 < stats[M.MISMATCH_LOGPROB_DIFF_MEAN] < 0.05, stats[M.MISMATCH_LOGPROB_DIFF_MEAN]
    grads, _, stats = grads_after_step(mixed, rows, 8, monkeypatch)
    # The same weights and dtype, batched otherwise: bfloat16 rounding differs with the shape.
    assert stats[M.MISMATCH_LOGPROB_DIFF_MEAN] < 0.05
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_logits_are_computed_only_from_the_first_completion_column(tiny_model_path, monkeypatch):
    from trainer.models import load_model

    model = load_model(tiny_model_path, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    # Prompts of 6 .. 12 tokens: no logits are needed before column 5 (the 6th token
    # predicts the first completion token of the shortest-prompt row).
    shapes = [(12, 3), (6, 9), (9, 1), (7, 5)]
    ids = [torch.randint(5, 200, (p + c,), generator=g).tolist() for p, c in shapes]
    batch = TokenBatch.build(
        [s[:p] for s, (p, _) in zip(ids, shapes)], [s[p:] for s, (p, _) in zip(ids, shapes)],
        [[0.0] * c for _, c in shapes], pad_id=0, device="cpu",
    )
    assert batch.first_column == 5 and batch.input_ids.shape[1] == 15
    head_rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[1]))

    def logprobs_and_grads():
        model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(model, batch, 0.7, entropy_grad=True)
        ((lp + 0.1 * ent) * batch.completion_mask).sum().backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp, ent, grads = logprobs_and_grads()
    monkeypatch.setattr(policy_mod, "_takes_logits_to_keep", lambda model_class: False)  # every column
    full_lp, full_ent, full_grads = logprobs_and_grads()
    assert head_rows == [15 - 5, 15]  # positions 5..14 against all 15
    assert lp.shape == full_lp.shape == (4, 14)
    mask = batch.completion_mask > 0
    torch.testing.assert_close(lp[mask], full_lp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[mask], full_ent[mask], rtol=1e-5, atol=1e-5)
    assert (lp[:, :5] == 0).all() and (ent[:, :5] == 0).all()  # not computed: outside every mask
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


def shared_prompt_rows():
    """Three prompts of 2, 7 and 11 tokens with 3, 1 and 4 completions of 1 .. 9 tokens."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for p, completions in ((7, (4, 9, 1)), (2, (5,)), (11, (2, 6, 6, 3))):
        prompt = torch.randint(5, 200, (p,), generator=g).tolist()
        rows += [(prompt, torch.randint(5, 200, (c,), generator=g).tolist()) for c in completions]
    return rows


def test_shared_prompts_are_forwarded_once_with_the_same_log_probs_entropy_and_gradients(tiny_model_path):
    from trainer.models import load_model

    model = load_model(tiny_model_path, "cpu", torch.float32)
    rows = shared_prompt_rows()
    forwarded = []  # tokens per forward
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: forwarded.append(args[0].numel()))

    def logprobs_and_grads(share):
        batch = TokenBatch.build([p for p, _ in rows], [c for _, c in rows], [[0.0] * len(c) for _, c in rows],
                                 pad_id=0, device="cpu", share_prompts=share)
        model.zero_grad(set_to_none=True)
        forwarded.clear()
        lp, ent = token_logprobs(model, batch, 0.7, entropy_grad=True)
        ((lp + 0.1 * ent) * batch.completion_mask).sum().backward()
        mask = batch.completion_mask > 0
        return batch, list(forwarded), lp[mask], ent[mask], {n: p.grad.clone() for n, p in model.named_parameters()}

    shared, shared_tokens, lp, ent, grads = logprobs_and_grads(True)
    plain, plain_tokens, full_lp, full_ent, full_grads = logprobs_and_grads(False)
    assert plain.prompts is None and plain_tokens == [8 * 17]  # every row: its prompt + completion, padded to 17
    # The prompts but their last token once ([3, 10]), then each row from its last prompt token on ([8, 10]).
    assert shared.prompts.input_ids.shape == (3, 10) and shared.prompts.row_prompt.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert shared_tokens == [3 * 10, 8 * 10] and shared.input_ids.shape == (8, 10)
    assert shared.attention_mask.shape == (8, 20) and shared.num_tokens == plain.num_tokens == 36
    # The row of the 2-token prompt: its one earlier token, then its own 6; its positions go on from 1.
    assert shared.attention_mask[3].tolist() == [1] + [0] * 9 + [1] * 6 + [0] * 4
    assert shared.position_ids[3].tolist() == list(range(1, 11))
    torch.testing.assert_close(lp, full_lp, rtol=1e-5, atol=1e-5)  # the same tokens in the same order
    torch.testing.assert_close(ent, full_ent, rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads, full_grads)


def assert_same_gradients(grads, expected):
    """Equal up to float32 summation order: per tensor, |difference| <= 1e-5 |expected|."""
    for name, g in grads.items():
        assert (g - expected[name]).norm() <= 1e-5 * expected[name].norm() + 1e-8, name
    assert any(g.norm() > 0 for g in expected.values())


def test_rows_share_prompts_only_where_a_prompt_repeats_and_has_two_tokens():
    def build(prompts, even_unrepeated=False):
        return TokenBatch.build(prompts, [[9]] * len(prompts), [[0.0]] * len(prompts), 0, "cpu", share_prompts=True,
                                even_unrepeated=even_unrepeated)

    assert build([[1, 2], [3, 4]]).prompts is None  # nothing repeats
    assert build([[1], [1]]).prompts is None  # a one-token prompt: nothing to forward before the rows
    assert build([[1, 2], [1, 2], [3]]).prompts is None
    assert build([[1, 2], [1, 2], [3, 4]]).prompts.row_prompt.tolist() == [0, 0, 1]
    # With ranks every micro-batch shares, repeated or not (the same collectives on each).
    assert build([[1, 2], [3, 4]], even_unrepeated=True).prompts.row_prompt.tolist() == [0, 1]
    assert build([[1, 2], [3]], even_unrepeated=True).prompts is None


def test_a_step_with_shared_prompts_sums_to_the_gradient_of_one_without(tmp_path, tiny_model_path, monkeypatch):
    t = trainer_without_engines(tmp_path, tiny_model_path, "trainer.dtype=float32")
    assert t.share_prompts  # the default, and the tiny model takes a key/value cache
    plain_rows = rows_for(t)
    behaviour = {tuple(r["prompt"] + r["completion"]): r["behaviour"] for r in plain_rows}
    rows = []
    for i, (p, c) in enumerate(shared_prompt_rows()):
        lp = behaviour.get(tuple(p + c)) or [-1.0] * len(c)
        rows.append({"prompt": p, "completion": c, "behaviour": lp, "in_loss": True, "on_policy": False,
                     "advantage": [1.0, -0.5, 0.25][i % 3]})
    shared, built_shared, shared_stats = grads_after_step(t, rows, 4, monkeypatch)
    t.share_prompts = False
    plain, built_plain, plain_stats = grads_after_step(t, rows, 4, monkeypatch)
    # Shared: the rows of one prompt together (the order that forwards the fewest tokens
    # here), each micro-batch as wide as its longest completion + 1. Plain: by length, as
    # wide as its longest row.
    assert [(n, w) for n, w, _ in built_shared] == [(4, 10), (4, 7)]
    assert [(n, w) for n, w, _ in built_plain] == [(4, 17), (4, 13)]
    assert_same_gradients(shared, plain)
    assert shared_stats[M.LOSS_POLICY] == pytest.approx(plain_stats[M.LOSS_POLICY], rel=1e-5)


def test_micro_batches_are_ordered_to_forward_the_fewest_tokens():
    def rows(*spec):  # (prompt id, prompt length, completion length)
        return [{"prompt": [k] * p, "completion": [7] * c} for k, p, c in spec]

    def widths(order, size):
        return [[len(r["completion"]) for r in order[i : i + size]] for i in range(0, len(order), size)]

    # Two prompts, each with one long completion: by completion length, the long ones share
    # a micro-batch (2 x 9 + 2 x 21 = 60, then 2 x 9 + 2 x 3 = 24 tokens) instead of each
    # prompt's (9 + 2 x 21 = 51, twice).
    two = rows((1, 10, 20), (1, 10, 2), (2, 10, 20), (2, 10, 1))
    assert forwarded_tokens([[1] * 10, [2] * 10], [[7] * 20, [7] * 20], True) == 60
    assert forwarded_tokens([[1] * 10, [1] * 10], [[7] * 20, [7] * 2], True) == 51
    assert widths(micro_batch_order(two, True, 2), 2) == [[20, 20], [2, 1]]
    # Four rows of one prompt and one of another, micro-batches of 4: sorted by whole
    # length, the four share theirs (9 + 4 x 6 = 33, then 11 for the other row); by prompt
    # or by completion length, the 6-token prompt's row joins the first micro-batch (2 x 9
    # + 4 x 6 = 42, then 12 for the row left over).
    grouped = rows((1, 10, 5), (2, 6, 5), (1, 10, 4), (1, 10, 3), (1, 10, 2))
    assert [r["prompt"][0] for r in micro_batch_order(grouped, True, 4)] == [1, 1, 1, 1, 2]
    # Without sharing (or with distinct prompts): by whole length, longest first.
    assert widths(micro_batch_order(two, False, 2), 2) == [[20, 20], [2, 1]]
    assert forwarded_tokens([[1] * 10, [1] * 10], [[7] * 20, [7] * 2], False) == 2 * 30
    distinct = rows((1, 2, 1), (2, 10, 30), (3, 3, 4))
    assert [len(r["prompt"]) + len(r["completion"]) for r in micro_batch_order(distinct, True, 2)] == [40, 7, 3]
