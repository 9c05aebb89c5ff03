"""Prepare the built-in models once (no download): python scripts/prepare_model.py [smollm2|tiny|all]

Prints the path of each prepared model directory. The cache dir is $RLT_CACHE_DIR or
~/.cache/rl-trainer; --cache-dir overrides both.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from trainer.errors import ExitCode, ModelError  # noqa: E402
from trainer.models import BUILTIN_MODELS, resolve_model_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="all", choices=[*BUILTIN_MODELS, "all"])
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    names = BUILTIN_MODELS if args.model == "all" else (args.model,)
    try:
        for name in names:
            print(resolve_model_path(name, args.cache_dir))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
