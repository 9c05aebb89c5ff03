"""trainer.policy.warm_up_optimizer: the optimizer's state allocated before the first
step, with no effect on what the steps compute. The real tiny model, no engine."""

import torch

from trainer.models import load_model
from trainer.policy import TokenBatch, token_logprobs, warm_up_optimizer


def _steps(model, optimizer, batches):
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        logprobs, _ = token_logprobs(model, batch, 1.0, with_entropy=False)
        (-(logprobs * batch.completion_mask).sum()).backward()
        optimizer.step()


def test_a_warmed_up_optimizer_steps_exactly_as_a_fresh_one(tiny_model_path):
    batches = [
        TokenBatch.build([[5, 6, 7]] * 2, [[8, 9, 10, 11], [12, 13]], [[0.0] * 4, [0.0] * 2], 0, "cpu"),
        TokenBatch.build([[3, 4]] * 3, [[20, 21], [22], [23, 24, 25]], [[0.0] * 2, [0.0], [0.0] * 3], 0, "cpu"),
    ]
    fresh = load_model(tiny_model_path, torch.device("cpu"), torch.float32).train()
    warmed = load_model(tiny_model_path, torch.device("cpu"), torch.float32).train()
    before = {k: v.clone() for k, v in warmed.state_dict().items()}
    opt_fresh = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    opt_warmed = torch.optim.AdamW(warmed.parameters(), lr=1e-2, weight_decay=0.1)

    warm_up_optimizer(opt_warmed)
    # Allocated, as a fresh AdamW's first step would make it, and nothing moved.
    assert len(opt_warmed.state) == len(list(warmed.parameters()))
    for state in opt_warmed.state.values():
        assert state["step"].item() == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(p.grad is None for p in warmed.parameters())
    assert all(torch.equal(before[k], v) for k, v in warmed.state_dict().items())
    assert [g["lr"] for g in opt_warmed.param_groups] == [1e-2]

    _steps(fresh, opt_fresh, batches)
    _steps(warmed, opt_warmed, batches)
    moved = [k for k, v in warmed.state_dict().items() if not torch.equal(before[k], v)]
    assert moved  # the steps did train
    for (k, a), b in zip(fresh.state_dict().items(), warmed.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt_fresh.state.values(), opt_warmed.state.values()):
        assert a["step"].item() == b["step"].item() == 2
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
