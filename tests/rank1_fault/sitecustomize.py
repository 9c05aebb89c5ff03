"""Put on PYTHONPATH by tests: rank 1 of a run with trainer ranks raises in its
RLT_FAIL_AT_STEP-th optimizer step (counting from 1; not counting the lr=0 step that
torch's checkpoint loading takes to create the state); every other process is untouched."""

import os

if os.environ.get("RANK") == "1" and os.environ.get("RLT_RANKS_DIR") and os.environ.get("RLT_FAIL_AT_STEP"):
    import torch.optim

    _step = torch.optim.AdamW.step
    _calls = [0]

    def _failing_step(self, *args, **kwargs):
        if all(group["lr"] == 0 for group in self.param_groups):
            return _step(self, *args, **kwargs)
        _calls[0] += 1
        if _calls[0] == int(os.environ["RLT_FAIL_AT_STEP"]):
            raise RuntimeError("injected fault on rank 1")
        return _step(self, *args, **kwargs)

    torch.optim.AdamW.step = _failing_step
