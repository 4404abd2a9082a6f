"""`db-adapt`: the command line. Thin: it parses, calls the library, and turns errors into one line.

Every error db-adapters raises on purpose (`DbAdaptersError`), and file-system errors, become one
line on stderr naming the input and what to do, with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .errors import DbAdaptersError, InputError

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning expected errors into one line and an exit code instead of a traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (DbAdaptersError, OSError) as error:
            if debug:
                raise
            _fail(_one_line(error))
        except KeyboardInterrupt:
            _fail("interrupted; the adapter was not saved (checkpoints in --output-dir stay; --resume).", code=130)
        except Exception as error:  # a bug of ours: still one line, the traceback on request
            if debug:
                raise
            _fail(
                f"unexpected {type(error).__name__}: {_one_line(error)} (rerun with --debug for details)",
                code=1,
            )

    return run


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error} : {error.filename!r}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def load_pipeline(model: str, device: str | None) -> Any:
    """Load a diffusers pipeline from a local folder or hub id (safetensors only) onto `device`."""
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging
    from diffusers import DiffusionPipeline

    from .distributed import training_device
    from .pipelines import check_supported

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()

    if not model:
        raise InputError("--model is required: a local diffusers folder or a hub id.")
    local = Path(model)
    if not local.exists() and (local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
        # A hub id is "owner/name"; anything else that looks like a path is a folder that is not there.
        raise InputError(
            f"--model {model!r} could not be loaded: no such folder; pass a local diffusers folder or a hub id "
            "(owner/name)."
        )
    if local.exists() and not (local / "model_index.json").is_file():
        raise InputError(f"--model {model!r} is not a diffusers pipeline folder (it has no model_index.json).")
    try:
        # use_safetensors=True: never unpickle weights; a .bin-only model is refused.
        pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True, safety_checker=None)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--model {model!r} could not be loaded ({_one_line(error)[:200]}); pass a local diffusers folder, "
            "or a hub id with network access or a filled hub cache."
        ) from None
    check_supported(pipe)
    device = device or str(training_device())  # each launched process its own GPU
    try:
        pipe.to(torch.device(device))
    except (RuntimeError, AssertionError) as error:
        raise InputError(f"--device {device!r} cannot be used ({_one_line(error)[:120]}).") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


# `db-adapt` alone shows the help through this usage error (click >= 8.2); it stays as click prints it.
_SHOWS_HELP = (getattr(click.exceptions, "NoArgsIsHelpError", ()),)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click.UsageError as error:
        if error.ctx is None or isinstance(error, _SHOWS_HELP):
            raise
        hint = f" (see '{error.ctx.command_path} --help')"
        raise click.UsageError(" ".join(error.format_message().split()) + hint) from None


class OneLineUsageGroup(click.Group):
    """A command group whose usage errors (a missing or malformed option) are one line, like every other error.

    Click prints a usage error as the usage text, a hint and the error on three lines; here it is
    `Error: Missing option '--images'. (see 'db-adapt train --help')`, with the same exit code 2.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        # A sub-command parses its options inside the group's invoke, so its usage errors pass here.
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="db-adapters")
def main(debug: bool) -> None:
    """DreamBooth personalization for diffusers pipelines."""
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep transformers' and diffusers' info chatter and loading bars off a command's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' hook
    # Our warnings are meant for the person at the shell: no source file and line number.
    return f"Warning: {message}\n"


@main.command()
@click.option("--model", default=None, help="Local diffusers folder or hub id (default: the shipped toy base model).")
@click.option("--images", required=True, help="Folder of 3-5 photos of the subject.")
@click.option("--class-noun", required=True, help='The subject\'s class, e.g. "dog".')
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Adapter file (.safetensors).")
@click.option("--strategy", default="lora", show_default=True, help="Registered strategy: lora, full, ...")
@click.option("--identifier", default=None, help="Rare token for the subject; chosen for you if left out.")
@click.option("--instance-prompt", default=None, help='Default "a {identifier} {class noun}".')
@click.option("--class-prompt", default=None, help='Default "a {class noun}".')
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 800; the toy model recommends 300).")
@click.option("--learning-rate", type=float, default=None, help="Default: LoRA 1e-4, full 5e-6 (toy model: 1e-3).")
@click.option("--text-encoder-learning-rate", type=float, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--gradient-accumulation-steps", type=int, default=1, show_default=True)
@click.option("--prior-preservation/--no-prior-preservation", default=True, show_default=True)
@click.option("--num-class-images", type=int, default=None, help="Class images (default 200; toy model: 32).")
@click.option("--prior-loss-weight", type=float, default=1.0, show_default=True)
@click.option("--class-images", default=None, help="Folder of your own class images (topped up if too few).")
@click.option("--train-text-encoder", is_flag=True)
@click.option("--resolution", type=int, default=None, help="Default: the model's native size.")
@click.option("--snr-gamma", type=float, default=None)
@click.option("--noise-offset", type=float, default=0.0, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None)
@click.option("--use-8bit-adam", is_flag=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--lr-scheduler", default="constant", show_default=True)
@click.option("--lr-warmup-steps", type=int, default=0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--validation-prompt", "validation_prompts", multiple=True, help='Preview prompt; "{id}" ok.')
@click.option("--validation-every", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output-dir", default=None, help="The run's files: class-image cache, previews, checkpoints.")
@click.option(
    "--checkpoint-every",
    type=int,
    default=None,
    help="Save the training state to OUTPUT_DIR/checkpoints every N steps.",
)
@click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Keep the newest K checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT_DIR/checkpoints.")
@click.option("--class-image-dir", default=None, help="Class-image cache (default: OUTPUT_DIR/class_images).")
@click.option("--random-flip", is_flag=True)
@click.option("--class-sampler", default="dpmsolver++", show_default=True)
@click.option("--class-inference-steps", type=int, default=25, show_default=True)
@click.option("--rank", type=int, default=None, help="LoRA rank (default 4).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default = rank).")
@click.option("--target-modules", default=None, help="LoRA UNet modules, comma-separated.")
@click.option("--dropout", type=float, default=None, help="LoRA dropout.")
@click.option("--strict", is_flag=True, help="A questionable --identifier is an error, not a warning.")
@click.option("--save-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@friendly_errors
def train(
    model: str, images: str, class_noun: str, output: str, device: str | None, save_dtype: str, **kw: Any
) -> None:
    """Personalize a pipeline on a folder of subject photos and save the adapter."""
    from .adapter_file import check_output_path
    from .api import personalize
    from .binder import validate_class_noun
    from .data import load_images
    from .distributed import processes

    output_path = check_output_path(output)
    # Cheap checks first: a typo in --images should not wait for a multi-GB model to load.
    subject = load_images(images, name="--images")
    class_noun = validate_class_noun(class_noun)
    if kw["class_images"] is not None:
        kw["class_images"] = load_images(kw["class_images"], name="--class-images")
    strategy_options = {k: kw.pop(k) for k in ("rank", "alpha", "target_modules", "dropout") if kw[k] is not None}
    for key in ("rank", "alpha", "target_modules", "dropout"):
        kw.pop(key, None)
    kw["validation_prompts"] = list(kw["validation_prompts"]) or None
    pipe = load_pipeline(model, device) if model else load_toy_base(device)
    adapter = personalize(pipe, subject, class_noun, **kw, **strategy_options)
    adapter.save(output_path, dtype=save_dtype)
    if not processes(pipe.device).is_main:
        return  # under torchrun / accelerate launch the main process wrote the file and reports it
    click.echo(f"saved {output_path} ({output_path.stat().st_size / 1e6:.2f} MB)")
    click.echo(f'identifier: {adapter.identifier}   try: --prompt "a {{id}} {adapter.class_noun} on the beach"')


@main.command()
@click.option("--model", required=True, help="Local diffusers folder or hub id the adapter was trained on.")
@click.option("--adapter", "adapter_path", default=None, help="Adapter file; without one, the base model.")
@click.option("--prompt", required=True, help='Prompt; "{id}" becomes the adapter\'s identifier.')
@click.option("--negative-prompt", default=None)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="LoRA strength.")
@click.option("--device", default=None)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="PNG grid of the images.")
@friendly_errors
def generate(
    model: str,
    adapter_path: str | None,
    prompt: str,
    negative_prompt: str | None,
    num_images: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    lora_scale: float,
    device: str | None,
    output: str,
) -> None:
    """Generate images with a saved adapter (a PNG grid)."""
    from .generation import check_png_path, render_grid

    output_path = check_png_path(output)
    if num_images <= 0 or steps <= 0:
        raise InputError("--num-images and --steps must be positive integers.")
    pipe = load_pipeline(model, device)
    identifier = None
    if adapter_path is not None:
        from .adapter import load_adapter

        identifier = load_adapter(pipe, adapter_path).identifier
    if "{id}" in prompt and identifier is None:
        raise InputError('--prompt uses "{id}" but no --adapter was given.')
    text = prompt.replace("{id}", identifier or "")
    render_grid(
        pipe,
        text,
        output_path,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        lora_scale=lora_scale,
    )
    click.echo(f"wrote {output_path} ({num_images} image(s) of {text!r})")


def load_toy_base(device: str | None, folder: str | None = None) -> Any:
    """The shipped toy base model (or a toy model folder), as `--model`'s default."""
    from .toy.base import base_dir

    if folder is None and not (base_dir() / "model_index.json").is_file():
        raise InputError(
            "this install ships no toy base model yet; pass --model, or train one with examples/train_toy_base.py."
        )
    return load_pipeline(str(folder or base_dir()), device or "cpu")


@main.command()
@click.option("--subject", default="star_box", show_default=True, help="A toy subject (db_adapters.toy.SUBJECTS).")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default=None, help="A toy model folder (default: the shipped toy base model).")
@click.option("--steps", type=int, default=None, help="Personalization steps (default: the model's recommendation).")
@click.option("--device", default=None, help="Default cpu.")
@friendly_errors
def demo(subject: str, out: str, model: str | None, steps: int | None, device: str | None) -> None:
    """Personalize the toy base model on a toy subject and write a before/after sheet."""
    from .toy.demo import run_demo
    from .toy.world import SUBJECTS

    if subject not in SUBJECTS:
        raise InputError(f"--subject {subject!r} is not a toy subject; choose one of: {', '.join(SUBJECTS)}.")
    pipe = load_toy_base(device, model)
    result = run_demo(subject, out, pipe=pipe, steps=steps)
    click.echo(f"sheet    {result.sheet}")
    click.echo(f"adapter  {result.adapter} (identifier {result.identifier!r})")
    click.echo(f"time     personalize {result.personalize_s:.0f} s, total {result.total_s:.0f} s")


@main.command()
@click.argument("adapter_path", metavar="ADAPTER")
@friendly_errors
def inspect(adapter_path: str) -> None:
    """Print an adapter file's metadata and size."""
    from .adapter_file import unpack_metadata
    from .safe_reading import read_file_metadata, read_tensors

    info = unpack_metadata(read_file_metadata(adapter_path), adapter_path)
    tensors = read_tensors(adapter_path)
    info["tensors"] = len(tensors)
    info["parameters"] = sum(t.numel() for t in tensors.values())
    info["file_bytes"] = Path(adapter_path).stat().st_size
    click.echo(json.dumps(info, indent=2, sort_keys=True))


@main.command(name="eval")
@click.option("--model", required=True, help="Local diffusers folder or hub id (the adapter's base model).")
@click.option("--adapter", "adapter_path", default=None, help="Adapter file; without one, the base model.")
@click.option("--images", required=True, help="Folder of the subject's real photos.")
@click.option("--class-noun", default=None, help="The subject's class (default: the adapter's).")
@click.option("--live", is_flag=True, help="Live subject (pet): DreamBench's live-subject prompts.")
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Subsample the 25 prompts.")
@click.option("--pres-images", type=click.IntRange(min=1), default=16, show_default=True, help='"a [class]" images.')
@click.option("--embedder", type=click.Choice(["real", "tiny"]), default="real", show_default=True)
@click.option("--dino-model", default=None, help="DINO hub id or folder (default facebook/dino-vits16).")
@click.option("--clip-model", default=None, help="CLIP hub id or folder (default openai/clip-vit-base-patch32).")
@click.option("--lpips-weights", default=None, help="LPIPS alex safetensors file (for DIV).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder: report.json, sheet.png.")
@friendly_errors
def evaluate_command(
    model: str,
    adapter_path: str | None,
    images: str,
    class_noun: str | None,
    embedder: str,
    dino_model: str | None,
    clip_model: str | None,
    lpips_weights: str | None,
    device: str | None,
    output: str,
    **settings: Any,
) -> None:
    """Score a pipeline (and adapter) with the DreamBooth paper's metrics on DreamBench prompts."""
    from .data import load_images
    from .evaluation import evaluate

    output_dir = Path(output)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {output!r} is a file; give a folder for report.json and sheet.png.")
    # Cheap checks first: a typo in --images or a missing evaluator should not wait for the pipeline.
    real = load_images(images, name="--images")
    embedders = _evaluation_embedders(embedder, dino_model, clip_model, lpips_weights, device)
    pipe = load_pipeline(model, device)
    adapter = None
    if adapter_path is not None:
        from .adapter import load_adapter

        adapter = load_adapter(pipe, adapter_path)
    report = evaluate(
        pipe,
        adapter,
        real,
        class_noun,
        embedders=embedders,
        progress=lambda line: click.echo(line, err=True),
        **settings,
    )
    report.models["adapter"] = adapter_path
    json_path, png_path = report.save(output_dir / "report.json", output_dir / "sheet.png")
    scores = "  ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in report.metrics().items()
    )
    click.echo(scores)
    click.echo(f"wrote {json_path} and {png_path}")


def _evaluation_embedders(
    kind: str, dino_model: str | None, clip_model: str | None, lpips_weights: str | None, device: str | None
) -> Any:
    from .evaluation.embedders import CLIP_MODEL, DINO_MODEL, load_embedders, tiny_embedders

    if kind == "tiny":
        return tiny_embedders()
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedders = load_embedders(dino_model or DINO_MODEL, clip_model or CLIP_MODEL, lpips_weights, device=device)
    if lpips_weights is None:
        warnings.warn("no --lpips-weights: DIV is left out of the report (null).", stacklevel=1)
    return embedders


if __name__ == "__main__":  # pragma: no cover
    main()
