"""What the benchmarks share: a markdown table, and its section in docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import shlex
import sys

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def quiet() -> None:
    """Warnings and errors only: a benchmark prints its table, not the run's log."""
    from trainer.log import configure_logging

    configure_logging("console", "WARNING", stream=sys.stderr)


def training_model(model: str, dtype: str):
    """The policy as the CPU trainer holds it, for a benchmark of its forward and backward:
    (model in train mode, autocast dtype or None); memory kept as the trainer keeps it."""
    import torch

    from trainer.models import load_model, resolve_model_path
    from trainer.policy import resolve_dtype
    from workers.hardware import keep_freed_memory

    keep_freed_memory()
    device = torch.device("cpu")
    weights, autocast = resolve_dtype(dtype, device)
    return load_model(resolve_model_path(model), device, weights).train(), autocast


def cpu_model() -> str:
    """The processor's model name, as /proc/cpuinfo gives it ("?" where it does not)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(name: str, body: str) -> None:
    """Print `body` and put it in docs/benchmarks.md under `## name`, replacing the
    section an earlier run wrote, with the command and the machine."""
    print(body, flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"## {name}\n\n`{command}`, {when}, {platform.machine()} with {os.cpu_count()} CPUs\n\n{body.strip()}\n"
    )
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEach section: the command, when, and what it printed.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
