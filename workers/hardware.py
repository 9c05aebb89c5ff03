"""What the hardware computes natively, for choosing dtypes, and how a CPU process
allocates memory (torch only, no vLLM)."""

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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees, for reuse, instead of
    handing it back to the kernel: True if it now does (False off glibc).

    A CPU training step allocates and frees the same few hundred MB every micro-batch
    (SmolLM2's logits alone are 16 x 77 x 49152 floats, 242 MB). By default glibc maps
    each block over 32 MB on its own and unmaps it when freed, so every micro-batch
    faults its memory in again, page by page; in a VM that hands freed pages back to
    the host, each fault costs a trip to the host. Serving every allocation from the
    heap and never trimming it keeps the pages: forward+backward of a 16 x 58-token
    micro-batch of SmolLM2 took 3.4-3.9 s instead of 5.2-5.5 s here
    (scripts/bench_cold_step.py). Memory in use then stays at the step's peak,
    which the next step needs anyway. Only this process's later allocations change;
    blocks a thread's arena cannot hold are still mapped on their own."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int: 2 GiB is "never".
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
