"""What the hardware computes natively, for choosing dtypes (torch only, no vLLM)."""

from __future__ import annotations

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether `device` has bfloat16 arithmetic in hardware: a GPU that supports it, or
    a CPU with AVX512-BF16 or AMX (elsewhere bfloat16 is emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def engine_dtype(name: str, on_cpu: bool) -> str:
    """The dtype an engine is built with for engine.dtype=`name`: "auto" is vLLM's
    choice (bfloat16 for a float32 model), except on a CPU that would emulate bfloat16:
    there float32 (tiny model on an AVX2-only CPU: 4x the tokens/s of bfloat16)."""
    if name == "auto" and on_cpu and not bf16_native(torch.device("cpu")):
        return "float32"
    return name
