"""Train the toy base model from scratch on a CPU (the recipe behind the shipped weights).

    python examples/train_toy_base.py --work-dir runs/toy-base            # all stages, resumable
    python examples/train_toy_base.py --work-dir runs/toy-base --max-minutes 50   # one sitting

    # a finished run grown by one more denoiser cycle (3,000 steps, peak 2e-4), in a new work dir:
    python examples/train_toy_base.py --work-dir runs/toy-base-2 --branch-from runs/toy-base --restarts 3000:2e-4

Rerunning the command continues from the last checkpoint, with the settings the run began with
(recorded in WORK_DIR/recipe.json; only per-sitting ones such as --max-minutes may change). The
result is a diffusers folder, `WORK_DIR/pipeline`, that `StableDiffusionPipeline.from_pretrained` loads; copying it to
`src/db_adapters/assets/toy/base` makes it the shipped default.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from db_adapters.errors import InputError
from db_adapters.toy.pretrain import OutOfTime, run
from db_adapters.toy.recipe import PretrainConfig, branch_run, config_for


def cycle(text: str) -> tuple[int, float]:
    """`STEPS:PEAK` (e.g. `3000:2e-4`) -> (3000, 0.0002)."""
    try:
        steps, peak = text.split(":")
        return int(steps), float(peak)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEPS:PEAK, e.g. 3000:2e-4") from None


def _is_branch_of(work_dir: Path, source: Path) -> bool:
    recipe = work_dir / "recipe.json"
    branched = json.loads(recipe.read_text()).get("branched_from", {}) if recipe.is_file() else {}
    return branched.get("work_dir") == str(source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--branch-from", type=Path, default=None, help="a run to continue in --work-dir (new)")
    for field in fields(PretrainConfig):
        if field.name == "restarts":
            parser.add_argument(
                "--restarts",
                type=cycle,
                nargs="*",
                default=None,
                metavar="STEPS:PEAK",
                help="further cosine cycles of the denoiser; the flag alone: none (v3's recipe)",
            )
        elif field.name != "work_dir":
            kind = {"float": float, "float | None": float, "str": str}.get(field.type, int)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    work_dir, source = args.pop("work_dir"), args.pop("branch_from")
    try:
        if source is not None:
            restarts = args.pop("restarts") or []
            if not _is_branch_of(work_dir, source):  # else a paused branch: the same command continues it
                branch_run(source, work_dir, restarts)
        # A started run continues with the settings it began with (recorded in WORK_DIR/recipe.json).
        config = config_for(work_dir, **{k: v for k, v in args.items() if v is not None})
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
