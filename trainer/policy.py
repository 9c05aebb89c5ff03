"""The policy in torch: token log-probs of sampled completions, and its weights for sync."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json

import structlog
import torch
from torch import Tensor

from workers.hardware import bf16_native
from workers.shm import SAFETENSORS_DTYPES, SHM_DIR, SharedWeights, SharedWeightsHandle, no_room

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class SharedPrompts:
    """The distinct prompts of a micro-batch, each forwarded once: rows that continue the
    same prompt (a group's samples) attend to its one set of keys and values instead of
    forwarding it again (in a default step the prompt is half of each row's tokens)."""

    input_ids: Tensor  # [K, P] each distinct prompt but its last token, right-padded
    attention_mask: Tensor  # [K, P]
    row_prompt: Tensor  # [N] which of the K prompts each row continues


@dataclasses.dataclass
class TokenBatch:
    """Prompt + completion sequences, right-padded, in the "predicts the next token"
    layout: column t holds what the model says about token t+1.

    With `prompts` (TokenBatch.build(share_prompts=True) on rows that share prompts) the
    rows hold only what follows the prompts' forward: each row's last prompt token, its
    completion and padding, at `position_ids`; column t still predicts token t+1, so
    column 0 predicts the first completion token."""

    input_ids: Tensor  # [N, T] prompt + completion + padding (shared prompts: last prompt token + completion + padding)
    attention_mask: Tensor  # [N, T] (shared prompts: [N, P + T], the prompt's mask then the row's)
    completion_mask: Tensor  # [N, T-1] 1 where column t predicts a completion token
    behaviour_logprobs: Tensor  # [N, T-1] vLLM's log-prob of that token (0 elsewhere)
    num_tokens: int  # completion tokens in the batch
    first_column: int = 0  # no column before it predicts a completion token (the shortest prompt's length - 1)
    prompts: SharedPrompts | None = None
    position_ids: Tensor | None = None  # [N, T] shared prompts: each token's position in its sequence

    @staticmethod
    def build(
        prompts: list[list[int]],
        completions: list[list[int]],
        behaviour: list[list[float]],
        pad_id: int,
        device: torch.device | str,
        in_loss: list[bool] | None = None,  # [N] False: the row's tokens stay out of the loss mask
        share_prompts: bool = False,  # forward each distinct prompt once where rows repeat one
        even_unrepeated: bool = False,  # ... and where none repeats (ranks must all forward alike)
    ) -> TokenBatch:
        n = len(prompts)
        shared = _shares_prompts(prompts, share_prompts, even_unrepeated)
        # The tokens each row forwards itself: all of them, or the last prompt token on.
        own = [(p[-1:] if shared else p) + c for p, c in zip(prompts, completions)]
        t = max(map(len, own))
        input_ids = torch.full((n, t), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        completion_mask = torch.zeros((n, t - 1), dtype=torch.float32)
        behaviour_lp = torch.zeros((n, t - 1), dtype=torch.float32)
        first_column = t - 1
        for i, (seq, c, b) in enumerate(zip(own, completions, behaviour)):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
            # Column len(seq)-len(c)-1 (the last prompt token's) predicts the first completion token.
            start = len(seq) - len(c) - 1
            first_column = min(first_column, start)
            completion_mask[i, start : start + len(c)] = 1.0 if in_loss is None or in_loss[i] else 0.0
            behaviour_lp[i, start : start + len(c)] = torch.tensor(b, dtype=torch.float32)
        shared_prompts = position_ids = None
        if shared:
            distinct = list(dict.fromkeys(map(tuple, prompts)))
            width = max(map(len, distinct)) - 1
            prompt_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
            prompt_mask = torch.zeros((len(distinct), width), dtype=torch.long)
            for k, p in enumerate(distinct):
                prompt_ids[k, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
                prompt_mask[k, : len(p) - 1] = 1
            index = {p: k for k, p in enumerate(distinct)}
            row_prompt = torch.tensor([index[tuple(p)] for p in prompts], dtype=torch.long)
            shared_prompts = SharedPrompts(prompt_ids.to(device), prompt_mask.to(device), row_prompt.to(device))
            attention_mask = torch.cat([prompt_mask[row_prompt], attention_mask], dim=1)
            # Each row goes on from its own prompt's end, whatever the padding before it.
            position_ids = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1) + torch.arange(t)
            position_ids = position_ids.to(device)
        return TokenBatch(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            completion_mask=completion_mask.to(device),
            behaviour_logprobs=behaviour_lp.to(device),
            num_tokens=int(completion_mask.sum().item()),
            first_column=first_column,
            prompts=shared_prompts,
            position_ids=position_ids,
        )


def _shares_prompts(prompts: list[list[int]], share_prompts: bool, even_unrepeated: bool = False) -> bool:
    """Whether TokenBatch.build forwards these rows' prompts once: asked to, some row
    repeats a prompt (or even_unrepeated), and every prompt can be shared."""
    distinct = set(map(tuple, prompts))
    return share_prompts and (even_unrepeated or len(distinct) < len(prompts)) and can_share(prompts)


def can_share(prompts: list[list[int]]) -> bool:
    """Whether these prompts can be forwarded before their rows: a one-token prompt leaves
    nothing to forward first (its all-padding row would attend to nothing)."""
    return min(map(len, prompts)) >= 2


def forwarded_tokens(prompts: list[list[int]], completions: list[list[int]], share_prompts: bool) -> int:
    """The tokens, padding included, that the model forwards for TokenBatch.build's batch
    of these rows (its compute, but for attention)."""
    if _shares_prompts(prompts, share_prompts):
        distinct = set(map(tuple, prompts))
        return len(distinct) * (max(map(len, distinct)) - 1) + len(prompts) * (max(map(len, completions)) + 1)
    return len(prompts) * max(len(p) + len(c) for p, c in zip(prompts, completions))


def micro_batch_order(rows: list[dict], share_prompts: bool, size: int) -> list[dict]:
    """The rows ({"prompt": ids, "completion": ids, ...}) in the order the trainer cuts
    them into micro-batches of `size`, each padded to its own longest. The loss is a sum
    over rows, so the order changes nothing but what is computed: of rows sorted by
    length, by prompt (each prompt forwarded once per micro-batch) or by completion length
    (a few prompts per micro-batch, little padding), the order that forwards the fewest
    tokens."""

    def cost(order: list[dict]) -> int:
        chunks = [order[k : k + size] for k in range(0, len(order), size)]
        return sum(forwarded_tokens([r["prompt"] for r in c], [r["completion"] for r in c], share_prompts) for c in chunks)

    orders = [sorted(rows, key=lambda r: len(r["prompt"]) + len(r["completion"]), reverse=True)]
    if share_prompts:
        longest: dict[tuple, int] = {}  # prompt -> its longest completion
        for r in rows:
            key = tuple(r["prompt"])
            longest[key] = max(longest.get(key, 0), len(r["completion"]))
        orders.append(sorted(rows, key=lambda r: (longest[tuple(r["prompt"])], r["prompt"], len(r["completion"])), reverse=True))
        orders.append(sorted(rows, key=lambda r: len(r["completion"]), reverse=True))
    return min(orders, key=cost)  # the first of equals: by length


def token_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float, entropy_grad: bool = False,
    with_entropy: bool = True, autocast: torch.dtype | None = None, sharded: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob under the policy of each next token, and the entropy of the policy's
    next-token distribution there: ([N, T-1], [N, T-1]). Logits are divided by the
    sampling temperature, so they match vLLM's processed log-probs. The entropy carries
    a gradient only with `entropy_grad` (an entropy bonus in the loss); otherwise it is
    computed without one, for the loss/entropy metric; with_entropy=False skips it (None):
    it costs a softmax over the vocabulary for every token.

    `autocast` (mixed precision: trainer.dtype=mixed): the forward's matmuls run in that
    dtype over float32 weights; everything from the logits on (log-softmax, entropy, the
    loss) is float32, so no log-prob is rounded to bfloat16.

    Shared prompts (`batch.prompts`): a first forward of the distinct prompts makes
    their keys and values (with their gradient), each row gets its prompt's, and the
    rows' own tokens are forwarded after them; the gradient of a shared prompt sums
    over the rows that continue it, as if each had forwarded it. `sharded` (FSDP2):
    backward gathers a block's weights when gradient reaches the block's output, and
    the prompts' forward's last block would get gradient only through its keys and
    values, inside the block; its output joins the log-probs with a zero weight, so
    that its weights are gathered too."""
    device_type = batch.input_ids.device.type
    # Only the columns from `first_column` on can predict a completion token: the LM
    # head, the log-softmax and the entropy skip the prompt before them (most of each
    # row once completions are short; SmolLM2's logits are 49152 wide). The model
    # computes the logits of its last `keep` positions (HF's `logits_to_keep`).
    first = batch.first_column if _takes_logits_to_keep(type(model)) else 0
    keep = batch.input_ids.shape[1] - first
    kwargs = {"logits_to_keep": keep} if first else {}
    with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if batch.prompts is not None:
            # logits_to_keep=1: the prompts' logits are not needed, only their cache.
            out = model(
                input_ids=batch.prompts.input_ids, attention_mask=batch.prompts.attention_mask,
                use_cache=True, logits_to_keep=1,
            )
            cache = out.past_key_values
            cache.reorder_cache(batch.prompts.row_prompt)  # [K, ...] -> [N, ...], a gather autograd goes back through
            kwargs.update(past_key_values=cache, position_ids=batch.position_ids)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
    logits = logits[:, :-1].float()  # [N, T-1-first, V]: columns first..T-2
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, first + 1 :].unsqueeze(-1)  # [N, T-1-first, 1]
    lse = torch.logsumexp(logits, dim=-1)  # [N, T-1-first]
    # log_softmax then gather, written as logit - logsumexp to avoid a second [N, T-1, V] tensor.
    logprobs = logits.gather(-1, targets).squeeze(-1) - lse
    if batch.prompts is not None and sharded:
        logprobs = logprobs + 0.0 * out.logits.sum()  # see the docstring: FSDP2's backward hooks
    if not with_entropy:
        return _pad_columns(logprobs, first), None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        src, src_lse = (logits, lse) if entropy_grad else (logits.detach(), lse.detach())
        entropy = src_lse - (torch.softmax(src, dim=-1) * src).sum(-1)  # H = lse - E_p[logit]
    return _pad_columns(logprobs, first), _pad_columns(entropy, first)


def _pad_columns(values: Tensor, first: int) -> Tensor:
    """[N, T-1-first] -> [N, T-1]: zeros in the prompt columns that were not computed
    (outside every mask)."""
    return torch.nn.functional.pad(values, (first, 0)) if first else values


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether token_logprobs can forward a batch's shared prompts once: the model takes
    a key/value cache, position ids and `logits_to_keep` (transformers' causal LMs do)."""
    params = inspect.signature(type(model).forward).parameters
    return _takes_logits_to_keep(type(model)) and {"past_key_values", "position_ids", "use_cache"} <= params.keys()


_SAFETENSORS_DTYPES = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}


def _safetensors_header(model: torch.nn.Module, dtype: torch.dtype) -> tuple[bytes, dict, int]:
    """The safetensors header (length prefix included, padded to 8 bytes) of the
    policy's weights in `dtype`, each parameter's data offsets, and the data's size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, size = {}, 0
    for name, p in model.named_parameters():  # a sharded parameter's shape is the full one
        n = p.numel() * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(p.shape), "data_offsets": [size, size + n]}
        size += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    return len(head).to_bytes(8, "little") + head, header, size


def weights_image_size(model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, tensors) of the safetensors image weights_to_bytes writes."""
    head, header, size = _safetensors_header(model, dtype)
    return len(head) + size, len(header)


def weights_to_bytes(model: torch.nn.Module, dtype: torch.dtype, keep: bool = True, into=None) -> bytearray | None:
    """The policy's weights as a safetensors image in the engine's dtype, for the sync:
    into `into` (a writable buffer of weights_image_size bytes: the shared memory the
    engines map) or a new bytearray.

    Written one parameter at a time, cast on the way (one pass over the weights): the
    full weights exist once, in the engine's dtype, even when each rank holds a shard
    (a sharded parameter is gathered, used and dropped: trainer/ranks.full_parameters).
    Every rank must call this; only those with `keep` get the image (the others None).
    `named_parameters` lists a tied weight (lm_head = embed_tokens) once, which
    safetensors requires; vLLM reties it on load."""
    from trainer.ranks import full_parameters

    head, header, size = _safetensors_header(model, dtype)
    start = len(head)
    buf = None
    if keep:
        buf = bytearray(start + size) if into is None else into
        if len(buf) != start + size:
            raise ValueError(f"weights_to_bytes: the buffer holds {len(buf)} bytes, the image {start + size}")
        buf[:start] = head
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, tensor in full_parameters(model):
        begin, end = header[name]["data_offsets"]
        if keep and end > begin:
            out = torch.frombuffer(buf, dtype=dtype, offset=start + begin, count=(end - begin) // itemsize)
            out.copy_(tensor.reshape(-1))  # to CPU, in the engine's dtype
            del out  # no view may outlive the call: a mapping with views cannot close
        del tensor
    return buf


class EngineWeights:
    """Where the policy's weights go for the engines: a shared-memory file the engines
    map (workers/shm.py), rewritten in place at every sync, or, when /dev/shm cannot
    hold it, new bytes each time (pickled through the RPC socket: slower, same result).

    The file is made at the first sync and unlinked once every engine has mapped it
    (`mapped()`), so a run that is killed later leaves nothing in /dev/shm."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.shared: SharedWeights | None = None
        self._no_shared = False

    def write(self, model: torch.nn.Module) -> SharedWeightsHandle | bytearray:
        if self.shared is None and not self._no_shared:
            size, tensors = weights_image_size(model, self.dtype)
            try:
                self.shared = SharedWeights(size, tensors)
            except OSError as e:
                if not no_room(e):
                    raise
                self._no_shared = True
                log.warning("weight_sync_without_shared_memory", bytes=size, directory=str(SHM_DIR), error=str(e))
        if self.shared is None:
            return weights_to_bytes(model, self.dtype)
        weights_to_bytes(model, self.dtype, into=self.shared.buffer)
        return self.shared.handle()

    def mapped(self) -> None:
        """Every engine holds a mapping: the name can go."""
        if self.shared is not None:
            self.shared.unlink()

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The policy's device; with trainer ranks on GPUs, rank r trains on GPU r."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, engine_dtype: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None) for trainer.dtype: "mixed" is float32
    weights with bfloat16 autocast; any other name is that dtype throughout. "auto" is
    mixed where the device computes bfloat16 natively and the engines generate in it
    (engine.dtype `engine_dtype` is bfloat16, or auto: bfloat16 for a float32 model),
    else float32.

    Not mixed beside a float32 engine: the policy then learns through bfloat16 numerics
    that the engine does not sample with, and the two drift apart until the PPO clip
    drops a large share of the tokens (README, Time to quality: at staleness 0 every seed
    of that pairing collapsed or declined late; the other way round, a bfloat16 engine
    beside a float32 trainer, did not).
    """
    if name == "auto":
        name = "mixed" if bf16_native(device) and engine_dtype in ("auto", "bfloat16") else "float32"
    if name == "mixed":
        return torch.float32, torch.bfloat16
    return getattr(torch, name), None


def warm_up_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Allocate the gradients and AdamW's moments now (while the engines start) instead
    of in the first step: a fresh process's first AdamW step took 3.7-5.5 s against
    0.2-0.3 s later (SmolLM2 on a CPU, scripts/bench_cold_step.py), most of it faulting in
    1 GB of new moments.

    The way torch's distributed checkpoint initializes optimizer state: a step with zero
    gradients at lr 0, which moves no weight and leaves the moments at zero; then the
    step counters go back to 0 and the gradients are dropped, so what is left is the
    state a fresh AdamW would start from, already allocated (and, with
    trainer.keep_freed_memory, the gradients' pages kept for the first backward). The
    step is elementwise: no collective, each rank warms its own shard."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
    optimizer.zero_grad(set_to_none=True)
