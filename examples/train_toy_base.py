"""Train the toy base model from scratch on a CPU (the recipe behind the shipped weights).

    python examples/train_toy_base.py --work-dir runs/toy-base            # all stages, resumable
    python examples/train_toy_base.py --work-dir runs/toy-base --max-minutes 50   # one sitting

Rerunning the command continues from the last checkpoint, with the settings the run began with
(recorded in WORK_DIR/recipe.json; only per-sitting ones such as --max-minutes may change). The
result is a diffusers folder, `WORK_DIR/pipeline`, that `StableDiffusionPipeline.from_pretrained` loads; copying it to
`src/db_adapters/assets/toy/base` makes it the shipped default.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from db_adapters.errors import InputError
from db_adapters.toy.pretrain import OutOfTime, PretrainConfig, config_for, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    for field in fields(PretrainConfig):
        if field.name != "work_dir":
            kind = {"float": float, "float | None": float, "str": str}.get(field.type, int)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    try:
        # A started run continues with the settings it began with (recorded in WORK_DIR/recipe.json).
        config = config_for(args.pop("work_dir"), **{k: v for k, v in args.items() if v is not None})
        folder = run(config)
    except InputError as refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except OutOfTime as stop:
        print(f"paused: {stop}")
        return 3
    print(f"toy base model ready: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
